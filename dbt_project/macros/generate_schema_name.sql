{#
  Custom schemas are used verbatim (staging, intermediate, marts, ...): they are the names CDME's declarations,
  validation reports and OpenLineage datasets speak of, so they must not depend on who runs dbt. Runs are
  isolated by database instead (one per environment or test session).
#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {%- if custom_schema_name is none -%}
        {{ target.schema }}
    {%- else -%}
        {{ custom_schema_name | trim }}
    {%- endif -%}
{%- endmacro %}
