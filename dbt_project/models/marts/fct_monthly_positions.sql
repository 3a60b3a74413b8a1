-- Folded from the daily mart, not from trades: MonthlyAggregate coarsens DailyAggregate in cdme.yml.
select
    cast(date_trunc('month', business_date) as date) as month_start,
    book,
    currency_code,
    coalesce(sum(trade_count), 0) as trade_count,
    coalesce(sum(gross_notional), 0) as gross_notional,
    coalesce(sum(gross_notional_usd), 0) as gross_notional_usd,
    coalesce(sum(net_notional_usd), 0) as net_notional_usd,
    count(*) as days_reported
from {{ ref('fct_daily_positions') }}
group by cast(date_trunc('month', business_date) as date), book, currency_code
