#!/usr/bin/env bash
# cargo-deny (licenses, bans, sources, advisories) against deny.toml, fully offline.
#
# The advisory database cannot be fetched here: TRELLIS_ADVISORY_DB (default ../shared/advisory-db
# next to the checkout) is a dated snapshot of RustSec's database (its SNAPSHOT file says which).
# cargo-deny opens its database as a git checkout under `db-path`, so the snapshot is copied there
# and committed once per snapshot, dated as the snapshot. cargo-deny itself is installed once per
# machine at the pinned version (cargo install caches it in ~/.cargo/bin).
set -euo pipefail
cd "$(dirname "$0")/.."

DENY_VERSION=0.20.2
SNAPSHOT_DIR=${TRELLIS_ADVISORY_DB:-../shared/advisory-db}
# cargo-deny names the checkout of each db-url after a hash of the URL (here RustSec's).
DB_DIR=target/advisory-dbs/advisory-db-3157b0e258782691

if [ ! -f "$SNAPSHOT_DIR/SNAPSHOT" ]; then
  echo "deny: no advisory database snapshot at $SNAPSHOT_DIR (set TRELLIS_ADVISORY_DB)" >&2
  exit 1
fi
if [ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $DENY_VERSION" ]; then
  echo "deny: installing cargo-deny $DENY_VERSION (once per machine)"
  cargo install cargo-deny --locked --version "$DENY_VERSION" --quiet
fi

snapshot_id=$(sha256sum "$SNAPSHOT_DIR/SNAPSHOT" | cut -c1-16)
if [ "$(cat "$DB_DIR/.trellis-snapshot" 2>/dev/null)" != "$snapshot_id" ]; then
  rm -rf "$DB_DIR"
  mkdir -p "$DB_DIR"
  cp -a "$SNAPSHOT_DIR/." "$DB_DIR/"
  date=$(grep -oE '[0-9]{4}-[0-9]{2}-[0-9]{2}' "$SNAPSHOT_DIR/SNAPSHOT" | head -n1)
  (
    cd "$DB_DIR"
    git init -q
    git add -A
    GIT_AUTHOR_DATE="${date}T00:00:00Z" GIT_COMMITTER_DATE="${date}T00:00:00Z" \
      git -c user.name=trellis -c user.email=trellis@localhost commit -q -m "RustSec snapshot $date"
  )
  echo "$snapshot_id" > "$DB_DIR/.trellis-snapshot"
fi
echo "deny: advisories from $(head -n1 "$SNAPSHOT_DIR/SNAPSHOT")"
exec cargo deny --frozen check
