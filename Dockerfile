# syntax=docker/dockerfile:1
# One image for the four CDME services; the command picks the service:
#   docker run IMAGE serve validation     (or adjoint, lineage, planner; each on its standard port 8001-8004)
#   docker run IMAGE migrate --all        (the one-shot schema migration)
#   docker run IMAGE generate ... / build ... / run ...   (any other `cdme` command)
# The dbt project and its cdme.yml are baked in at /app/dbt_project; mount another over it (read-only is enough:
# dbt's target and log paths go under CDME_HOME) or point CDME_PROJECT_DIR elsewhere.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: resolve and install the dependencies and CDME into a virtualenv ---------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, in their own layer, so a source change does not reinstall dbt and friends.
COPY pyproject.toml README.md ./
RUN mkdir services && touch services/__init__.py \
    && pip install . \
    && pip uninstall --yes cdme \
    && rm -rf services
COPY services ./services
RUN pip install --no-deps . \
    && python -m compileall -q /opt/venv/lib

# -- runtime: the virtualenv, the dbt project and nothing to build with ---------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="cdme" \
      org.opencontainers.image.description="CDME services: validation, adjoint, lineage, planner" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 cdme \
    && useradd --system --uid 10001 --gid cdme --home-dir /var/lib/cdme --no-create-home \
       --shell /usr/sbin/nologin cdme \
    && install -d -o cdme -g cdme -m 0750 /var/lib/cdme /var/lib/cdme/runs /var/lib/cdme/openlineage
COPY --from=build /opt/venv /opt/venv
COPY dbt_project /app/dbt_project
# The installed package lives in site-packages, so the checkout-relative defaults of CDME_HOME and
# CDME_PROJECT_DIR do not apply: both are set here (and either can be overridden at run time).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CDME_HOME=/var/lib/cdme \
    CDME_PROJECT_DIR=/app/dbt_project \
    CDME_LOG_FORMAT=json
WORKDIR /var/lib/cdme
USER 10001:10001
EXPOSE 8001 8002 8003 8004
# Liveness only (/livez checks nothing external). The image does not know which service its command chose, so
# the probe accepts any of the four standard ports; compose and k8s probe the exact port of each service.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u\nfor p in (8001, 8002, 8003, 8004):\n    try:\n        u.urlopen(f'http://127.0.0.1:{p}/livez', timeout=2)\n        sys.exit(0)\n    except Exception:\n        pass\nsys.exit(1)"]
ENTRYPOINT ["cdme"]
CMD ["serve", "validation", "--host", "0.0.0.0"]
