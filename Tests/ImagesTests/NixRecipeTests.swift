import Foundation
import Testing

/// images/flake.nix and images/test-image.nix: the same recipe for Nix users. CI does not build
/// them (no Nix store there); it checks that they parse with Debian's nix-instantiate.
struct NixRecipeTests {
    @Test(arguments: ["flake.nix", "test-image.nix"])
    func nixFileParses(file: String) throws {
        let path = imagesDirectory.appendingPathComponent(file).path
        let result = try run(["nix-instantiate", "--parse", path], environment: ["NIX_REMOTE": "", "HOME": NSTemporaryDirectory()])
        #expect(result.status == 0, "nix-instantiate --parse \(file): \(result.stderr)")
        #expect(!result.stdout.isEmpty)
    }

    @Test func parseCheckRejectsABrokenRecipe() throws {
        // The check above is only worth something if nix-instantiate refuses bad syntax.
        let directory = try makeTemporaryDirectory("nix")
        defer { try? FileManager.default.removeItem(at: directory) }
        let source = try String(contentsOf: imagesDirectory.appendingPathComponent("test-image.nix"), encoding: .utf8)
        let broken = directory.appendingPathComponent("broken.nix")
        try source.replacingOccurrences(of: "runCommand", with: "runCommand {").write(to: broken, atomically: true, encoding: .utf8)
        let result = try run(["nix-instantiate", "--parse", broken.path], environment: ["NIX_REMOTE": "", "HOME": NSTemporaryDirectory()])
        #expect(result.status != 0)
    }

    @Test func nixRecipeRunsTheSameScriptWithoutAVM() throws {
        let nix = try String(contentsOf: imagesDirectory.appendingPathComponent("test-image.nix"), encoding: .utf8)
        let code = nix.split(separator: "\n").filter { !$0.trimmingCharacters(in: .whitespaces).hasPrefix("#") }.joined(separator: "\n")
        #expect(code.contains("pkgs.runCommand"))
        #expect(code.contains("${./build-test-image} --out \"$out\""))
        #expect(!code.contains("runInLinuxVM") && !code.contains("vmTools") && !code.contains("qemu"))
        let flake = try String(contentsOf: imagesDirectory.appendingPathComponent("flake.nix"), encoding: .utf8)
        #expect(flake.contains("import ./test-image.nix"))
    }
}
