select
    business_date,
    risk_factor_id,
    risk_class,
    tenor,
    currency_code,
    count(*) as position_count,
    coalesce(sum(sensitivity_usd), 0) as net_sensitivity_usd,
    coalesce(sum(abs(sensitivity_usd)), 0) as gross_sensitivity_usd
from {{ ref('int_trade_risk_sensitivities') }}
group by business_date, risk_factor_id, risk_class, tenor, currency_code
