# Sourced by benchmarks/batch.sh and benchmarks/xzfill.sh: the image they measure with.
#
# sparse_image IMG IMG_MB CHUNKS — IMG becomes an IMG_MB MiB raw image with CHUNKS runs of
# CHUNK_MB (4) MiB of root-filesystem-like content (binaries, libraries and text from /usr, as a tar
# stream) spread evenly from 1 MiB on, holes between them; IMG.bmap is bmaptool's map of it.
# (From 1 MiB on: a tar header at offset 0 would make the image a tar archive, issue 17.)
CHUNK_MB=4
sparse_image() {
  local img=$1 img_mb=$2 chunks=$3 chunk_mb=$CHUNK_MB i
  local payload=$img.payload mapped_mb=$(($3 * CHUNK_MB))
  { tar -cf - -C / usr/lib usr/share 2>/dev/null || true; } | head -c $((mapped_mb << 20)) > "$payload"
  [ "$(stat -c %s "$payload")" = $((mapped_mb << 20)) ] || { echo "could not read ${mapped_mb} MiB from /usr for the image" >&2; return 1; }
  rm -f "$img"
  truncate -s "${img_mb}M" "$img"
  local stride=$((img_mb / chunks))
  for ((i = 0; i < chunks; i++)); do
    dd if="$payload" of="$img" bs=1M count=$chunk_mb skip=$((i * chunk_mb)) seek=$((i * stride + 1)) conv=notrunc status=none
  done
  rm -f "$payload"
  bmaptool create -o "$img.bmap" "$img" 2>/dev/null
}
