{{ config(pre_hook=cdme_assert_pepper()) }}

with checked as (
    {{ trade_enrichment_checks() }}
)

select
    trade_id,
    business_date,
    trade_ts,
    book,
    {{ cdme_pseudonymize('counterparty_id') }} as counterparty_sk,
    counterparty_version,
    {{ cdme_pseudonymize('contact_email') }} as counterparty_contact_sk,
    country_code,
    credit_rating,
    instrument_type,
    side,
    notional,
    currency_code,
    round(notional * rate_to_usd, 2) as notional_usd,
    case when side = 'SELL' then -1 else 1 end * round(notional * rate_to_usd, 2) as signed_notional_usd
from checked
where failure_type is null
