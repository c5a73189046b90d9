import Foundation
import Testing
@testable import Tegra
import TestSupport

/// `provision tegra flash` offline: the profile is read and checked before any USB access.
@Suite struct TegraCommandTests {
    static let repositoryRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path
    static let jetsonProfile = repositoryRoot + "/images/jetson-tk1/profile.toml"

    func flash(_ profile: String, _ extra: [String] = []) throws -> (status: Int32, stdout: String, stderr: String) {
        try run(LibUSBUmockdevTests.provisionBinary, ["tegra", "flash", "--profile", profile] + extra)
    }

    /// The committed profile, with blob_dir pointed at `directory`.
    func profileCopy(in directory: TemporaryDirectory, replacing: [(String, String)] = []) throws -> String {
        var text = try String(contentsOfFile: Self.jetsonProfile, encoding: .utf8)
        text = text.replacingOccurrences(of: "/var/lib/provision/blobs/jetson-tk1", with: directory.path)
            .replacingOccurrences(of: "/var/lib/provision/blobs/tegra124/miniloader.bin", with: "miniloader.bin")
        for (old, new) in replacing { text = text.replacingOccurrences(of: old, with: new) }
        return try directory.write("profile.toml", Array(text.utf8))
    }

    func writeInputs(in directory: TemporaryDirectory, skipping: String? = nil) throws {
        let files: [(String, [UInt8])] = [
            ("miniloader.bin", pattern(136_920, seed: 1)),
            ("PM375_Hynix_2GB_H5TC4G63AFR_RDA_924MHz.bct", pattern(8192, seed: 2)),
            ("u-boot-nodtb-tegra.bin", pattern(300_000, seed: 3)),
            ("u-boot.dtb", try compileDTS(ubootDTS, in: directory)),
        ]
        for (name, bytes) in files where name != skipping { _ = try directory.write(name, bytes) }
    }

    @Test func committedProfileWithoutBlobsNamesTheMiniloaderAndItsOrigin() throws {
        let result = try flash(Self.jetsonProfile)
        #expect(result.status == 66)
        #expect(result.stderr.contains("/var/lib/provision/blobs/tegra124/miniloader.bin"))
        #expect(result.stderr.contains("miniloader") && result.stderr.contains("L4T"))
    }

    @Test(arguments: [("PM375_Hynix_2GB_H5TC4G63AFR_RDA_924MHz.bct", "cbootimage"),
                      ("u-boot-nodtb-tegra.bin", "U-Boot build"), ("u-boot.dtb", "U-Boot build")])
    func eachMissingInputIsNamedWithWhereItComesFrom(file: String, origin: String) throws {
        let directory = try TemporaryDirectory()
        try writeInputs(in: directory, skipping: file)
        let result = try flash(try profileCopy(in: directory))
        #expect(result.status == 66)
        #expect(result.stderr.contains(directory.file(file)) && result.stderr.contains(origin), "\(result.stderr)")
    }

    @Test func completeInputsButNoBoardReportsTheDevicesLookedFor() throws {
        let directory = try TemporaryDirectory()
        try writeInputs(in: directory)
        let result = try flash(try profileCopy(in: directory), ["--unit", "bench-07"])
        #expect(result.status == 69, "\(result.stderr)")
        #expect(result.stderr.contains("no Tegra device in recovery mode found"))
    }

    @Test func malformedTOMLIsAnInputErrorWithItsLine() throws {
        let directory = try TemporaryDirectory()
        let path = try directory.write("bad.toml", Array("[tegra]\nsoc = \"tegra124\"\nbct = \n".utf8))
        let result = try flash(path)
        #expect(result.status == 65)
        #expect(result.stderr.contains("bad.toml:3"), "\(result.stderr)")
    }

    @Test func missingKeyIsNamed() throws {
        let directory = try TemporaryDirectory()
        try writeInputs(in: directory)
        let result = try flash(try profileCopy(in: directory, replacing: [("uboot_dtb = ", "# uboot_dtb = ")]))
        #expect(result.status == 65)
        #expect(result.stderr.contains("uboot_dtb"), "\(result.stderr)")
    }

    @Test func unknownKeyIsRefusedWithItsLineLikeTheDaemonDoes() throws {
        let directory = try TemporaryDirectory()
        try writeInputs(in: directory)
        let result = try flash(try profileCopy(in: directory, replacing: [("boot_device = ", "boot_devise = ")]))
        #expect(result.status == 65)
        #expect(result.stderr.contains("profile.toml:") && result.stderr.contains("boot_devise"), "\(result.stderr)")
    }

    @Test func productIDOfAnotherChipIsRefused() throws {
        let directory = try TemporaryDirectory()
        try writeInputs(in: directory)
        let result = try flash(try profileCopy(in: directory, replacing: [("[0x7140, 0x7740]", "[0x7140, 0x7030]")]))
        #expect(result.status == 65)
        #expect(result.stderr.contains("0x7030"))
    }

    @Test func unsupportedSoCIsRefused() throws {
        let directory = try TemporaryDirectory()
        try writeInputs(in: directory)
        let result = try flash(try profileCopy(in: directory, replacing: [("\"tegra124\"", "\"tegra210\"")]))
        #expect(result.status == 65)
        #expect(result.stderr.contains("tegra210"))
    }
}
