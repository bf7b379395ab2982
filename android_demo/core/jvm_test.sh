#!/usr/bin/env bash
# Compile the plain-Java core and run its JUnit tests on the JVM, against a package and resize fixtures written
# by the Python side:  jvm_test.sh PACKAGE_DIR FIXTURES_DIR
# JUnit, Hamcrest and Gson come from Debian's packages (apt-get download + dpkg -x, no root, nothing installed),
# cached in ${MOBILEQAT_JAVA_CACHE:-~/.cache/mobileqat/java}.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
pkg="$(cd "$1" && pwd)"; fixtures="$(cd "$2" && pwd)"
cache="${MOBILEQAT_JAVA_CACHE:-$HOME/.cache/mobileqat/java}"
jars="$cache/root/usr/share/java"
if [ ! -f "$jars/junit4.jar" ] || [ ! -f "$jars/gson.jar" ] || [ ! -f "$jars/hamcrest.jar" ]; then
    mkdir -p "$cache/debs"
    (cd "$cache/debs" && apt-get download junit4 libhamcrest-java libgoogle-gson-java >/dev/null 2>&1) || {
        echo "jvm_test.sh: could not apt-get download junit4 libhamcrest-java libgoogle-gson-java (Debian archive" \
             "unreachable?); install them or put the jars in $jars" >&2; exit 2; }
    for deb in "$cache"/debs/*.deb; do dpkg -x "$deb" "$cache/root"; done
fi
command -v javac >/dev/null || { echo "jvm_test.sh: javac not found; install a JDK (17)" >&2; exit 2; }
cp="$jars/gson.jar:$jars/junit4.jar:$jars/hamcrest.jar"
build="$(mktemp -d)"; trap 'rm -rf "$build"' EXIT
javac -Xlint:all -Werror -d "$build" -cp "$cp" $(find "$here/src" -name '*.java')
java -cp "$build:$cp" -Dmobileqat.package="$pkg" -Dmobileqat.fixtures="$fixtures" \
    org.junit.runner.JUnitCore dev.mobileqat.core.CoreTest
