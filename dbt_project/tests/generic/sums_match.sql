{#
  A fold preserves its total: the sum of column_name in this model equals the sum of compare_column in
  compare_model (monthly = sum of daily). Exact equality: both sides are numeric, no float rounding.
#}
{% test sums_match(model, column_name, compare_model, compare_column) %}
with this_side as (
    select coalesce(sum({{ column_name }}), 0) as total from {{ model }}
),
other_side as (
    select coalesce(sum({{ compare_column }}), 0) as total from {{ compare_model }}
)
select this_side.total as model_total, other_side.total as compare_total
from this_side cross join other_side
where this_side.total <> other_side.total
{% endtest %}
