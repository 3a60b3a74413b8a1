{#
  Peppered surrogate keys for personal data. The pepper reaches PostgreSQL as the session setting cdme.pepper
  (CDME passes it through libpq's PGOPTIONS), so it never appears in compiled SQL, dbt artifacts or logs, and
  is never stored. Without it the hash would be a plain, reversible-by-dictionary digest: fail instead.
#}
{% macro cdme_pseudonymize(expression) -%}
    encode(sha256(convert_to(current_setting('cdme.pepper') || '|' || coalesce({{ expression }}::text, ''), 'UTF8')), 'hex')
{%- endmacro %}

{% macro cdme_assert_pepper() -%}
    do $cdme$
    begin
        if length(coalesce(current_setting('cdme.pepper', true), '')) < 16 then
            raise exception 'CDME pepper is not set: export CDME_PEPPER (>= 16 characters) before running dbt';
        end if;
    end
    $cdme$
{%- endmacro %}
