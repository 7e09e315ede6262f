# malaria-cells serve: the web page and REST API, one replica of many behind a load balancer,
# all writing to one PostgreSQL (docs/deploy.md). Build: docker build -t malaria-cells .
# BASE may name any Debian 12 (bookworm) image: its python3 is the one the wheels are for.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# Pango for the reports' PDF (WeasyPrint), a font for it, and Python with venv.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libpango-1.0-0 libpangoft2-1.0-0 \
        fonts-dejavu-core ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# The package's own dependencies first, from pyproject.toml alone: a code change then rebuilds
# only the last layers.
ENV VIRTUAL_ENV=/opt/malaria-cells PATH=/opt/malaria-cells/bin:$PATH PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 TF_CPP_MIN_LOG_LEVEL=3
# Behind a TLS-inspecting proxy, hand its CA bundle in as the secret "ca" (docs/deploy.md).
COPY pyproject.toml README.md /build/
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && python3 -m venv $VIRTUAL_ENV \
 && python3 -c "import tomllib; d = tomllib.load(open('/build/pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > /build/requirements.txt \
 && pip install -r /build/requirements.txt "setuptools>=68" wheel
COPY src /build/src
RUN pip install --no-deps --no-build-isolation /build && rm -rf /build

# Not root; nothing to write but the temporary folder.
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin malaria
USER 10001
WORKDIR /tmp

# MALARIA_CELLS_API_KEY (or --user-keys) is required on 0.0.0.0; MALARIA_CELLS_DB names the
# shared PostgreSQL (postgresql+psycopg://USER:PASSWORD@HOST/DB), whose schema the first
# replica to start brings up to date (the others wait on its lock).
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["malaria-cells"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
