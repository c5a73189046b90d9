# The test image of images/build-test-image, for people who build with Nix.
#
# runCommand style and no VM: unlike nixpkgs' make-disk-image or vmTools.runInLinuxVM, nothing
# boots a kernel. The derivation runs the very same script (one recipe, so the two cannot
# drift apart): the filesystems are built as files (mkfs.ext4 -d, mkfs.vfat + mcopy), then
# block-copied into an image partitioned with sfdisk, and bmaptool writes the bmap.
#
#   nix-build images/test-image.nix            # or: nix build ./images
#   ls result/   →  rpi-test.img  rpi-test.img.bmap  rpi-test.img.zst
#
# CI does not build this (it has no Nix store); it only checks that the file parses.
{ pkgs ? import <nixpkgs> { }
, epoch ? 1700000000      # SOURCE_DATE_EPOCH: same epoch, same bytes
, size ? "250MiB"
, compress ? "zst"
}:

pkgs.runCommand "rpi-test-image"
  {
    nativeBuildInputs = with pkgs; [
      bash coreutils findutils gnused gawk gnugrep
      util-linux        # sfdisk
      dosfstools mtools # mkfs.vfat, mmd, mcopy
      e2fsprogs         # mkfs.ext4 -d, debugfs, e2fsck
      bmaptool          # bmaptool create
      zstd xz gzip
      pkgsStatic.busybox  # the root filesystem's only program: statically linked
    ];
    SOURCE_DATE_EPOCH = toString epoch;
  }
  ''
    bash ${./build-test-image} --out "$out" --size ${size} --compress ${compress} --epoch ${toString epoch}
  ''
