{# Refinement type: three upper-case letters, the shape of an ISO 4217 alphabetic code. #}
{% test iso_currency_code(model, column_name) %}
select {{ column_name }}
from {{ model }}
where {{ column_name }} is not null
  and {{ column_name }} !~ '^[A-Z]{3}$'
{% endtest %}
