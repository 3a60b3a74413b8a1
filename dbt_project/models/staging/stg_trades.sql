select
    trade_id,
    epoch_date as business_date,
    trade_ts,
    book,
    counterparty_id,
    instrument_type,
    side,
    notional,
    upper(currency) as currency_code,
    status as trade_status,
    source_system
from {{ source('raw_trading', 'trades') }}
where epoch_date = {{ cdme_epoch() }}
