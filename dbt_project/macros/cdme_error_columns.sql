{#
  The structured fields every error sink carries (ARCHITECTURE.md, "Error domain"), with fixed types so that
  every sink of the project can be read the same way.
#}
{% macro cdme_error_columns(failure_type, offending_values, source_entity, source_key, source_epoch, morphism_path) -%}
    cast({{ failure_type }} as text) as failure_type,
    cast({{ offending_values }} as jsonb) as offending_values,
    cast({{ source_entity }} as text) as source_entity,
    cast({{ source_key }} as text) as source_key,
    cast({{ source_epoch }} as date) as source_epoch,
    cast({{ morphism_path }} as text[]) as morphism_path
{%- endmacro %}
