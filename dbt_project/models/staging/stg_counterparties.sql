-- The version of each counterparty in force at the start of the epoch: what the SCD2 snapshot records.
-- Written as an explicit predicate (the filter declared in _staging.yml), so every dropped version has a reason.
select
    c.counterparty_id,
    c.version as counterparty_version,
    c.valid_from,
    c.legal_name,
    c.contact_name,
    c.contact_email,
    c.country_code,
    c.credit_rating,
    c.lei
from {{ source('raw_trading', 'counterparties') }} as c
where c.valid_from <= {{ cdme_epoch_start() }}
    and c.version = (
        select max(v.version)
        from {{ source('raw_trading', 'counterparties') }} as v
        where v.counterparty_id = c.counterparty_id
            and v.valid_from <= {{ cdme_epoch_start() }}
    )
