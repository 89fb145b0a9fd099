#!/bin/bash
# Starts the apache/kafka image with the SASL_SSL listener's secrets read from files in $1:
# the keystore password and the JAAS config (user raft-stream) are exported only to the
# broker process, never written into compose.yaml.
set -euo pipefail
secrets=$1
KAFKA_SSL_KEYSTORE_PASSWORD=$(cat "$secrets/keystore-password")
password=$(cat "$secrets/password")
jaas="org.apache.kafka.common.security.plain.PlainLoginModule required"
jaas+=" user_raft-stream=\"$password\";"
export KAFKA_SSL_KEYSTORE_PASSWORD KAFKA_SSL_KEY_PASSWORD=$KAFKA_SSL_KEYSTORE_PASSWORD
# listener.name.secure.plain.sasl.jaas.config (the SECURE listener is SASL_SSL)
export KAFKA_LISTENER_NAME_SECURE_PLAIN_SASL_JAAS_CONFIG=$jaas
exec /etc/kafka/docker/run
