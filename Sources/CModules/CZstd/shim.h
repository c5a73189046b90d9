/* The buffer-less decompression API (ZSTD_decompressContinue and friends) and the frame
 * header reader are in zstd.h's "static linking only" section; libzstd.so exports them. */
#define ZSTD_STATIC_LINKING_ONLY
#include <zstd.h>
