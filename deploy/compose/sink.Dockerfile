# The demo's "provider": Postfix's smtp-sink accepts every message and discards it.
FROM debian:12-slim
RUN echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix \
 && rm -rf /var/lib/apt/lists/*
EXPOSE 2525
CMD ["/usr/sbin/smtp-sink", "-u", "nobody", "-h", "sink.demo.internal", "0.0.0.0:2525", "256"]
