# provision — see README.md. `make demo` and `make test` install what they need.
SHELL := /bin/bash
SWIFT ?= swift
CONFIG ?= debug
BUILD_FLAGS ?=
# Shipping binaries: the Swift runtime and Foundation linked in, so a station needs no Swift
# toolchain, and a `provision write` starts in ~20 ms instead of ~30 (no dynamic linking of
# a dozen Swift libraries). The benchmarks measure these.
RELEASE_FLAGS = -c release --static-swift-stdlib
BIN = $(shell $(SWIFT) build -c $(CONFIG) --show-bin-path 2>/dev/null)

# Debian packages: C libraries (headers + pkg-config) and the peers the tests check against.
DEB_LIBS = pkg-config libudev-dev libusb-1.0-0-dev libsystemd-dev libext2fs-dev libcrypt-dev \
           liblzma-dev libzstd-dev zlib1g-dev libsqlite3-dev
DEB_TOOLS = udev systemd bmap-tools whois openssl e2fsprogs fdisk dosfstools mtools \
            busybox-static zstd xz-utils gzip time passwd util-linux sqlite3 python3 cpio \
            device-tree-compiler umockdev libumockdev-dev nix-bin
# issue 15: cards booted under QEMU by the tests (x86, and the seed's vexpress-a9 with Debian's
# armhf kernel and busybox, unpacked by images/fetch-armhf-boot-parts: busybox-static:armhf
# installed would replace the host's busybox-static, which build-test-image runs)
DEB_TOOLS += qemu-system-x86 qemu-system-arm linux-image-amd64 kmod
ARMHF_PARTS = .build/armhf-boot-parts
DEB_TOOLS += cbootimage  # issue 14: reference image builder (cbootimage, bct_dump)
PIP_TOOLS += cryptography  # issue 14: independent AES-CMAC for the RCM message tests
DEB_TOOLS += chromium chromium-driver curl iproute2  # issue 19: the board's tests in a real browser
DEB_LIBS += libarchive-dev  # issue 17: bzip2/lz4/lzop/zip/tar images
DEB_TOOLS += lzop lz4 bzip2 zip p7zip-full qemu-utils  # issue 17: lzop is libarchive's lzo reader; the rest make test images
DEB_TOOLS += fuse3 libfuse3-dev gcc  # issue 16: FakeCard's FUSE program (tools/fake-card), built by the tests
DEB_TOOLS += postgresql  # issue 18: the shared ledger's tests
DEB_TOOLS += prometheus  # issue 18: promtool checks the metrics text in the tests
DEB_TOOLS += btrfs-progs  # the safety policy names a mounted btrfs card (its mountinfo line has no device number)
STAMP = .build/.deps-installed

.PHONY: deps build release test demo bench clean boot-parts
$(STAMP): Makefile
	@# Installed means "installed": `dpkg -s` also accepts a package removed with its configuration kept.
	@if dpkg-query -W -f='$${db:Status-Status}\n' $(DEB_LIBS) $(DEB_TOOLS) 2>&1 | grep -qvx installed; then \
	  echo ">>> installing Debian packages"; \
	  apt-get update -qq || echo ">>> apt-get update reported errors (a mirror mid-sync?); installing from the lists it has"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 $(DEB_LIBS) $(DEB_TOOLS) >/dev/null; \
	fi
	@for m in $(PIP_TOOLS); do python3 -c "import $$m" 2>/dev/null || python3 -m pip install -q $$m || exit 1; done
	@mkdir -p .build && touch $@

deps: $(STAMP)

boot-parts: deps
	@busybox true 2>/dev/null || { echo ">>> busybox-static for $$(dpkg --print-architecture) (the one installed does not run here)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static:$$(dpkg --print-architecture) >/dev/null; }
	images/fetch-armhf-boot-parts $(ARMHF_PARTS)

build: deps
	$(SWIFT) build -c $(CONFIG) $(BUILD_FLAGS)

release: deps
	$(SWIFT) build $(RELEASE_FLAGS) --product provisiond
	$(SWIFT) build $(RELEASE_FLAGS) --product provision

test: deps boot-parts
	$(SWIFT) build --build-tests $(BUILD_FLAGS)
	$(SWIFT) test --skip-build $(BUILD_FLAGS)

demo: build
	bash scripts/demo.sh

bench: deps
	bash benchmarks/write.sh

clean:
	rm -rf .build
