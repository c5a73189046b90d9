{
  description = "provision test images: the seed's Raspberry Pi SD layout, built without a VM";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      # nix build ./images#rpi-test-image   (CI does not build it; see README.md)
      packages = forAllSystems (pkgs: rec {
        rpi-test-image = import ./test-image.nix { inherit pkgs; };
        rpi-test-image-xz = import ./test-image.nix { inherit pkgs; compress = "xz"; };
        default = rpi-test-image;
      });
    };
}
