# Dante SOCKS5 server for the demo stack (Debian's dante-server).
FROM debian:12-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dante-server \
 && rm -rf /var/lib/apt/lists/*
COPY dante-entrypoint.sh /usr/local/bin/dante-entrypoint.sh
EXPOSE 1080
ENTRYPOINT ["/usr/local/bin/dante-entrypoint.sh"]
CMD ["danted", "-f", "/etc/danted.conf"]
