-- The version of each counterparty in force at the start of the epoch: what the SCD2 snapshot records.
select distinct on (counterparty_id)
    counterparty_id,
    version as counterparty_version,
    valid_from,
    legal_name,
    contact_name,
    contact_email,
    country_code,
    credit_rating,
    lei
from {{ source('raw_trading', 'counterparties') }}
where valid_from <= {{ cdme_epoch_start() }}
order by counterparty_id, version desc
