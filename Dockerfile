FROM python:3.11-slim
WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app app
COPY agents agents
COPY tables tables
COPY training training
RUN pip install --no-cache-dir . && python -m app.cli train --model-dir /srv/models
ENV MODEL_DIR=/srv/models DATA_DIR=/data WEB_HOST=0.0.0.0
EXPOSE 6066
CMD ["faust", "-A", "app", "worker", "-l", "info"]
