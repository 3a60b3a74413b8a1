{{ config(materialized='view') }}

select
    trade_id,
    business_date,
    trade_ts,
    book,
    counterparty_id,
    instrument_type,
    side,
    notional,
    currency_code,
    trade_status
from {{ ref('stg_trades') }}
where trade_status <> 'CANCELLED'
