# The ds01 services image used by compose.yaml (one image, one service per container).
FROM python:3.11-slim
WORKDIR /opt/ds01
COPY pyproject.toml constraints.txt ./
COPY protos protos
COPY services services
COPY clients clients
RUN pip install --no-cache-dir -c constraints.txt .
ENTRYPOINT ["ds01d", "--config", "/etc/ds01/ds01.yaml"]
