{{ config(schema='errors') }}

with checked as (
    {{ trade_enrichment_checks() }}
)

select
    {{ cdme_error_columns(
        failure_type='failure_type',
        offending_values="case failure_type
            when 'MISSING_COUNTERPARTY' then jsonb_build_object('counterparty_id', counterparty_id)
            when 'NON_POSITIVE_NOTIONAL' then jsonb_build_object('notional', notional)
            when 'UNKNOWN_CURRENCY' then jsonb_build_object('currency_code', currency_code)
        end",
        source_entity="'int_trades_active'",
        source_key='trade_id',
        source_epoch='business_date',
        morphism_path="array['raw_trading.trades', 'stg_trades', 'int_trades_active', 'int_trades_enriched']",
    ) }},
    book,
    trade_ts
from checked
where failure_type is not null
