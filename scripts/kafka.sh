#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft) from Apache Kafka's own jars on Maven
# Central, run with the machine's Java 17. No Docker, no distribution tarball.
#
#   scripts/kafka.sh up     start (idempotent), return once metadata requests are answered
#   scripts/kafka.sh down   stop cleanly (SIGTERM, then wait for the controlled shutdown)
#   scripts/kafka.sh wipe   stop and delete the broker's data (the jar cache is kept)
#
# Environment:
#   KAFKA_BOOTSTRAP_SERVERS  host:port of the broker (default 127.0.0.1:9092); the
#                            KRaft controller listens on the next port
#   PATTERNFLOW_CACHE        cache directory (default ~/.cache/patternflow): jars
#                            in kafka-<version>/libs, data in kafka-data/<port>
#   KAFKA_DATA_DIR           the broker's data directory instead (tests use a fresh one)
#   PYTHON                   a Python with confluent-kafka, used for the readiness check
#   KAFKA_SECURED_DIR        a directory: when set, the broker is the secured one
#                            (deploy/kafka/secured.properties: SASL_SSL with SCRAM-SHA-512,
#                            the StandardAuthorizer, ACLs), and the directory holds what
#                            its clients need, made on first start: ca.pem (the CA to
#                            trust) and admin.password (the super user's, admin)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
bootstrap=${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:9092}
bootstrap=${bootstrap%%,*}
host=${bootstrap%:*}
port=${bootstrap##*:}
controller_port=$((port + 1))
cache=${PATTERNFLOW_CACHE:-$HOME/.cache/patternflow}
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/kafka/pom.xml")
libs=$cache/kafka-$version/libs
data=${KAFKA_DATA_DIR:-$cache/kafka-data/$port}
python=${PYTHON:-python3}
secured=${KAFKA_SECURED_DIR:-}

answers_metadata() {
  "$python" - "$bootstrap" "$secured" <<'PY' >/dev/null 2>&1
import sys
from pathlib import Path
from confluent_kafka.admin import AdminClient
config = {"bootstrap.servers": sys.argv[1]}
if sys.argv[2]:
    secured = Path(sys.argv[2])
    config.update({
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "admin",
        "sasl.password": (secured / "admin.password").read_text().strip(), "ssl.ca.location": str(secured / "ca.pem"),
    })
AdminClient(config).list_topics(timeout=2)
PY
}

# The secured broker's CA, its certificate for the host, and the admin's password, made once per directory.
make_secrets() {
  [ -f "$secured/broker.p12" ] && return 0
  mkdir -p "$secured" && chmod 700 "$secured"
  openssl rand -hex 16 > "$secured/admin.password"
  openssl rand -hex 16 > "$secured/store.password"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=patternflow test CA" \
    -keyout "$secured/ca.key" -out "$secured/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$host" -keyout "$secured/broker.key" -out "$secured/broker.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:%s\n' "$host" > "$secured/san.ext"
  openssl x509 -req -in "$secured/broker.csr" -CA "$secured/ca.pem" -CAkey "$secured/ca.key" -CAcreateserial \
    -days 30 -extfile "$secured/san.ext" -out "$secured/broker.pem" 2>/dev/null
  openssl pkcs12 -export -in "$secured/broker.pem" -inkey "$secured/broker.key" -certfile "$secured/ca.pem" \
    -name broker -passout "file:$secured/store.password" -out "$secured/broker.p12"
  rm -f "$secured/broker.csr" "$secured/san.ext"
  echo "kafka: made a test CA and the broker's certificate in $secured"
}

fetch_jars() {
  [ -f "$libs/.complete" ] && return 0
  echo "kafka: resolving Apache Kafka $version jars from Maven Central into $libs"
  rm -rf "$libs" && mkdir -p "$libs"
  if ! mvn -q -B -f "$here/kafka/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$libs"; then
    echo "kafka: Maven could not resolve the jars. Check that Maven Central is reachable (mvn -v, ~/.m2/settings.xml) and retry." >&2
    exit 1
  fi
  touch "$libs/.complete"
}

write_config() {
  mkdir -p "$data/logs"
  local templates=("$here/../deploy/kafka/server.properties") admin_password="" store_password=""
  if [ -n "$secured" ]; then
    make_secrets
    templates+=("$here/../deploy/kafka/secured.properties")  # later lines override earlier ones
    admin_password=$(cat "$secured/admin.password") store_password=$(cat "$secured/store.password")
  fi
  ( umask 077; cat "${templates[@]}" | sed -e "s|@HOST@|$host|g" -e "s|@CONTROLLER_PORT@|$controller_port|g" \
      -e "s|@PORT@|$port|g" -e "s|@DATA@|$data|g" -e "s|@SECURED@|$secured|g" \
      -e "s|@ADMIN_PASSWORD@|$admin_password|g" -e "s|@STORE_PASSWORD@|$store_password|g" \
      > "$data/server.properties" )
  cat > "$data/log4j.properties" <<PROPS
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File=$data/server.log
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
PROPS
}

jvm=(java -Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true
     "-Dlog4j.configuration=file:$data/log4j.properties" -cp "$libs/*")

up() {
  if answers_metadata; then
    echo "kafka: a broker already answers at $bootstrap"
    return 0
  fi
  command -v java >/dev/null || { echo "kafka: java not found; install Java 17 (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
  fetch_jars
  write_config
  if [ ! -f "$data/logs/meta.properties" ]; then
    cluster_id=$("${jvm[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    local scram=()
    if [ -n "$secured" ]; then
      scram=(--add-scram "SCRAM-SHA-512=[name=admin,password=$(cat "$secured/admin.password")]")
    fi
    "${jvm[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$data/server.properties" "${scram[@]}" >/dev/null
    echo "kafka: formatted storage in $data/logs (cluster $cluster_id)"
  fi
  nohup "${jvm[@]}" kafka.Kafka "$data/server.properties" >"$data/stdout.log" 2>&1 &
  echo $! > "$data/broker.pid"
  for _ in $(seq 1 120); do
    if answers_metadata; then
      echo "kafka: Apache Kafka $version up at $bootstrap (pid $(cat "$data/broker.pid"), data in $data)"
      return 0
    fi
    if ! kill -0 "$(cat "$data/broker.pid")" 2>/dev/null; then
      break
    fi
    sleep 1
  done
  echo "kafka: the broker did not answer metadata requests at $bootstrap. Last lines of its logs:" >&2
  tail -n 25 "$data/server.log" "$data/stdout.log" >&2 2>/dev/null || true
  echo "kafka: check that port $port and $controller_port are free (ss -ltnp), or run 'make kafka-wipe' to reformat storage, then 'make kafka-up' again." >&2
  exit 1
}

down() {
  local pidfile=$data/broker.pid
  if [ ! -f "$pidfile" ] || ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "kafka: no local broker running for port $port"
    rm -f "$pidfile"
    return 0
  fi
  local pid
  pid=$(cat "$pidfile")
  kill "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; echo "kafka: stopped"; return 0; }
    sleep 1
  done
  echo "kafka: broker did not stop in 60 s; killing it" >&2
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  wipe) down; rm -rf "$data"; echo "kafka: deleted $data" ;;
  *) echo "usage: $0 up|down|wipe" >&2; exit 2 ;;
esac
