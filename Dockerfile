# The ds01 services image used by compose.yaml (one image, one service per container).
# BASE: any Python 3.11 image with pip; an air-gapped lab names its mirror's.
ARG BASE=python:3.11-slim
FROM ${BASE}
WORKDIR /opt/ds01
COPY pyproject.toml constraints.txt ./
COPY protos protos
COPY services services
COPY clients clients
RUN python3 -m pip install --no-cache-dir -c constraints.txt . && rm -rf build
ENTRYPOINT ["ds01d", "--config", "/etc/ds01/ds01.yaml"]
