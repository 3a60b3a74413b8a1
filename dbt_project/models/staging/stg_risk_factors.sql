select
    risk_factor_id,
    epoch_date as business_date,
    risk_class,
    currency as currency_code,
    tenor,
    tenor_years,
    risk_weight
from {{ source('raw_risk', 'risk_factors') }}
where epoch_date = {{ cdme_epoch() }}
