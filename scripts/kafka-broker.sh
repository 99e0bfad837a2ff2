#!/usr/bin/env bash
# Fetch Apache Kafka (KRaft, no ZooKeeper) jars from Maven Central into .cache/kafka/lib.
#
# Usage: scripts/kafka-broker.sh fetch        # download once; fast no-op on rerun
#        scripts/kafka-broker.sh classpath    # print the classpath (fetching first if needed)
#        scripts/kafka-broker.sh run DIR PORT # format DIR (once) and run a broker in the foreground
#
# The Python launcher (goodserve/broker/apache.py, used by the test session) calls `classpath`
# and then starts the JVM itself, so it can pick ports and restart with data kept on disk.
# KAFKA_VERSION and GOODSERVE_CACHE_DIR override the defaults.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
CACHE="${GOODSERVE_CACHE_DIR:-$ROOT/.cache}/kafka"
LIB="$CACHE/lib-$KAFKA_VERSION"
STAMP="$LIB/.complete"

fetch() {
  [ -f "$STAMP" ] && return 0
  command -v mvn >/dev/null || { echo "kafka-broker: Maven (mvn) is needed to fetch Kafka" >&2; exit 1; }
  command -v java >/dev/null || { echo "kafka-broker: Java 17+ is needed to run Kafka" >&2; exit 1; }
  mkdir -p "$CACHE"
  # several test sessions may start at once: one fetches, the others wait and reuse it
  exec 9>"$CACHE/.lock-$KAFKA_VERSION"
  flock 9
  if [ -f "$STAMP" ]; then flock -u 9; return 0; fi
  local pom="$CACHE/pom-$KAFKA_VERSION.xml"
  cat >"$pom" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>goodserve.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-reload4j</artifactId><version>1.7.36</version></dependency>
  </dependencies>
</project>
EOF
  echo "kafka-broker: fetching Apache Kafka $KAFKA_VERSION into $LIB (once)" >&2
  rm -rf "$LIB.tmp"
  mvn -q -B -f "$pom" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$LIB.tmp" >&2
  rm -rf "$LIB" && mv "$LIB.tmp" "$LIB" && touch "$STAMP"
  flock -u 9
}

classpath() {
  fetch
  local cp=""
  for j in "$LIB"/*.jar; do cp="${cp:+$cp:}$j"; done
  echo "$cp"
}

case "${1:-fetch}" in
  fetch) fetch ;;
  classpath) classpath ;;
  run)
    DIR="${2:?usage: run DIR PORT}"; PORT="${3:-9092}"
    fetch
    exec "$ROOT/.venv/bin/python" -m goodserve.broker.apache --workdir "$DIR" --port "$PORT"
    ;;
  *) echo "usage: $0 fetch|classpath|run DIR PORT" >&2; exit 2 ;;
esac
