{#
  Incremental by business date: each run replaces exactly its epoch's rows (delete+insert on business_date),
  so re-running an epoch is idempotent and earlier days stay for the monthly fold.
#}
{{ config(
    materialized='incremental',
    incremental_strategy='delete+insert',
    unique_key='business_date',
    on_schema_change='fail',
) }}

select
    business_date,
    book,
    currency_code,
    count(*) as trade_count,
    coalesce(sum(notional), 0) as gross_notional,
    coalesce(sum(notional_usd), 0) as gross_notional_usd,
    coalesce(sum(signed_notional_usd), 0) as net_notional_usd
from {{ ref('int_trades_enriched') }}
group by business_date, book, currency_code
