-- One row per accepted trade and risk factor of its currency: the 1:N explode that feeds the risk mart.
select
    t.trade_id,
    rf.risk_factor_id,
    t.business_date,
    t.book,
    rf.risk_class,
    rf.tenor,
    t.currency_code,
    round(t.signed_notional_usd * rf.risk_weight, 4) as sensitivity_usd
from {{ ref('int_trades_enriched') }} as t
inner join {{ ref('stg_risk_factors') }} as rf
    on rf.currency_code = t.currency_code
