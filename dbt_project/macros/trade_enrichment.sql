{#
  Active trades with their lookups and the first constraint each one fails (null when it fails none).
  int_trades_enriched keeps the passing rows and err_trades_enrichment the failing ones, so both read the
  same checks and every active trade lands in exactly one of them.
#}
{% macro trade_enrichment_checks() %}
    select
        t.trade_id,
        t.business_date,
        t.trade_ts,
        t.book,
        t.counterparty_id,
        t.instrument_type,
        t.side,
        t.notional,
        t.currency_code,
        cp.counterparty_version,
        cp.legal_name,
        cp.contact_email,
        cp.country_code,
        cp.credit_rating,
        fx.rate_to_usd,
        case
            when cp.counterparty_id is null then 'MISSING_COUNTERPARTY'
            when t.notional <= 0 then 'NON_POSITIVE_NOTIONAL'
            when fx.currency_code is null then 'UNKNOWN_CURRENCY'
        end as failure_type
    from {{ ref('int_trades_active') }} as t
    left join {{ ref('snap_counterparties') }} as cp
        on cp.counterparty_id = t.counterparty_id
        and t.trade_ts >= cp.dbt_valid_from
        and t.trade_ts < cp.dbt_valid_to
    left join {{ ref('currencies') }} as fx
        on fx.currency_code = t.currency_code
{% endmacro %}
