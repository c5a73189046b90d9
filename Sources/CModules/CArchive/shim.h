/* libarchive: streaming reads of bzip2, lz4, lzop, zip and tar images (issue 17). */
#include <archive.h>
#include <archive_entry.h>
