#!/bin/sh
# Builds target/debian/mde-actiond_<version>_amd64.deb: the release binary, its manual page
# and shell completions (generated from the CLI), then `cargo deb --no-build`.
# Needs cargo-deb (`cargo install cargo-deb --locked`).
set -eu
cd "$(dirname "$0")/../.."
cargo build --release --locked
target=${CARGO_TARGET_DIR:-target}
assets=$target/assets
mkdir -p "$assets"
bin=$target/release/mde-actiond
"$bin" man | gzip -9n > "$assets/mde-actiond.1.gz"
"$bin" completions bash > "$assets/mde-actiond.bash"
"$bin" completions zsh > "$assets/_mde-actiond"
"$bin" completions fish > "$assets/mde-actiond.fish"
# cargo-deb maps target/release/ to the real target directory; the generated assets are
# named under target/ in Cargo.toml, so they must be there too.
if [ "$target" != target ]; then
    mkdir -p target/assets && cp "$assets"/* target/assets/
fi
cargo deb --no-build --locked "$@"
