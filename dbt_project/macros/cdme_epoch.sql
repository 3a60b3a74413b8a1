{#
  The business date (epoch) one run processes, as a SQL date literal. Required at execution time: a run without
  it would silently process nothing or the wrong day. At parse time a placeholder keeps `dbt parse` working.
#}
{% macro cdme_epoch() -%}
    {%- set epoch = var('epoch_date', none) -%}
    {%- if epoch is none -%}
        {%- if execute -%}
            {{ exceptions.raise_compiler_error("epoch_date is not set: pass --vars '{epoch_date: YYYY-MM-DD}'") }}
        {%- endif -%}
        {%- set epoch = '1970-01-01' -%}
    {%- endif -%}
    {%- if not modules.re.match('^[0-9]{4}-[0-9]{2}-[0-9]{2}$', epoch | string) -%}
        {{ exceptions.raise_compiler_error("epoch_date must be YYYY-MM-DD, got '" ~ epoch ~ "'") }}
    {%- endif -%}
    date '{{ epoch }}'
{%- endmacro %}

{# The first instant of the epoch in UTC: reference data versions valid at the start of the business day. #}
{% macro cdme_epoch_start() -%}
    ({{ cdme_epoch() }}::timestamp at time zone 'UTC')
{%- endmacro %}
