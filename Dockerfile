# tidegate's image: the package and its pinned dependencies on Python 3.11, run as an unprivileged user.
#   docker build -t ghcr.io/tidegate/tidegate:0.1.0 .
# The build stage has a C compiler: setup.py compiles the request path with mypyc (--version says so).
FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
RUN python -m venv /opt/tidegate \
 && /opt/tidegate/bin/pip install --no-cache-dir . \
 && /opt/tidegate/bin/python -m compileall -q /opt/tidegate \
 && /opt/tidegate/bin/tidegate --version | grep -q "compiled with mypyc"

FROM python:3.11-slim-bookworm
# nft: the node agent's return path, which keeps clients' addresses under externalTrafficPolicy: Local
RUN apt-get update && apt-get install -y --no-install-recommends nftables && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/tidegate /opt/tidegate
ENV PATH=/opt/tidegate/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 80 443 9900 9901
ENTRYPOINT ["tidegate"]
CMD ["run", "--kubernetes", "--admin=0.0.0.0:9900"]
