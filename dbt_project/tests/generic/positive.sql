{# Refinement type: the column is strictly positive (nulls are not_null's business). #}
{% test positive(model, column_name) %}
select {{ column_name }}
from {{ model }}
where {{ column_name }} <= 0
{% endtest %}
