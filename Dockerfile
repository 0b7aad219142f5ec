# tidegate's image: the package and its pinned dependencies on Python 3.11, run as an unprivileged user.
#   docker build -t ghcr.io/tidegate/tidegate:0.1.0 .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/tidegate \
 && /opt/tidegate/bin/pip install --no-cache-dir . \
 && /opt/tidegate/bin/python -m compileall -q /opt/tidegate \
 && /opt/tidegate/bin/tidegate --version

FROM python:3.11-slim-bookworm
COPY --from=build /opt/tidegate /opt/tidegate
ENV PATH=/opt/tidegate/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 80 443 9900
ENTRYPOINT ["tidegate"]
CMD ["run", "--kubernetes", "--admin=0.0.0.0:9900"]
