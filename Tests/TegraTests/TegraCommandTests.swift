import Foundation
import Testing
@testable import Tegra
import TestSupport

/// `provision tegra flash` offline: the profile is read and checked before any USB access.
// Serialized: these synchronous tests keep a cooperative-pool thread busy (CPU or a child
// process); one at a time leaves the pool to the async suites (the station's jobs await on it).
@Suite(.serialized) struct TegraCommandTests {
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
            ("PM375_Hynix_2GB_H5TC4G63AFR_RDA_924MHz.bct", try ReferenceBCT.make(in: directory)),
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

    // MARK: provision tegra image

    func image(_ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
        try run(LibUSBUmockdevTests.provisionBinary, ["tegra", "image"] + arguments)
    }

    /// The command a person runs to check provision against cbootimage by hand.
    @Test(arguments: [1000, 16_384, 300_001])
    func imageCommandIsByteIdenticalToCbootimage(size: Int) throws {
        let directory = try TemporaryDirectory()
        let bct = try TegraBootImageTests.referenceBCT(.t124, in: directory)
        let uboot = pattern(size, seed: 11)
        let reference = try TegraBootImageTests.referenceImage(.t124, bct: bct, uboot: uboot, in: directory)
        let result = try image(["--soc", "tegra124", "--bct", directory.file("ref.bct"), "--uboot", directory.file("u-boot.bin"),
                                "--load-address", "0x80108000", "--entry", "0x80108000", "--output", directory.file("ours.img")])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("Bootloader used = 1"))
        let ours = [UInt8](try Data(contentsOf: URL(fileURLWithPath: directory.file("ours.img"))))
        #expect(ours == reference, "first difference \(TegraBootImageTests.firstDifference(ours, reference))")
        #expect(try run("cmp", [directory.file("ours.img"), directory.file("reference.img")]).status == 0)
    }

    @Test func imageCommandTakesItsDefaultsFromTheProfile() throws {
        let directory = try TemporaryDirectory()
        try writeInputs(in: directory)
        let profile = try profileCopy(in: directory)
        let result = try image(["--profile", profile, "--output", directory.file("boot0.img")])
        #expect(result.status == 0, "\(result.stderr)")
        let written = [UInt8](try Data(contentsOf: URL(fileURLWithPath: directory.file("boot0.img"))))
        #expect(SimulatedTegra.bootVerdict(forBoot0: written) == .booted(bootloaderLength: 300_000 + (try Data(contentsOf: URL(fileURLWithPath: directory.file("u-boot.dtb")))).count,
                                                                    loadAddress: 0x8010_8000))
        // And --check accepts it against the same profile.
        let check = try image(["--profile", profile, "--check", directory.file("boot0.img")])
        #expect(check.status == 0, "\(check.stderr)")
        #expect(check.stdout.contains("matches the U-Boot"))
    }

    @Test func imageCommandErrorsAreClear() throws {
        let directory = try TemporaryDirectory()
        let missing = try image(["--bct", directory.file("nope.bct"), "--uboot", directory.file("nope.bin"), "--load-address", "0x80108000",
                                 "--output", directory.file("o.img")])
        #expect(missing.status == 66 && missing.stderr.contains("nope"))
        _ = try directory.write("garbage.bct", pattern(8192, seed: 1))
        _ = try directory.write("u.bin", pattern(100, seed: 1))
        let garbage = try image(["--bct", directory.file("garbage.bct"), "--uboot", directory.file("u.bin"), "--load-address", "0x80108000",
                                 "--output", directory.file("o.img")])
        #expect(garbage.status == 65 && garbage.stderr.contains("not a BCT"), "\(garbage.stderr)")
        let badAddress = try image(["--bct", directory.file("garbage.bct"), "--uboot", directory.file("u.bin"), "--load-address", "eighty",
                                    "--output", directory.file("o.img")])
        #expect(badAddress.status == 65 && badAddress.stderr.contains("--load-address eighty"))
        let noOutput = try image(["--bct", directory.file("garbage.bct")])
        #expect(noOutput.status != 0 && noOutput.stderr.contains("--output"))
        let help = try image(["--help"])
        #expect(help.stdout.contains("cbootimage") && help.stdout.contains("--load-address"))
    }

    /// A profile may give the image cbootimage made instead of the raw BCT: it is checked, and an
    /// image for another U-Boot is refused naming the field, before any USB access.
    @Test func profileWithACbootimageImageIsCheckedAgainstTheUBoot() throws {
        let directory = try TemporaryDirectory()
        try writeInputs(in: directory)
        let bct = [UInt8](try Data(contentsOf: URL(fileURLWithPath: directory.file("PM375_Hynix_2GB_H5TC4G63AFR_RDA_924MHz.bct"))))
        let flashed = [UInt8](try Data(contentsOf: URL(fileURLWithPath: directory.file("u-boot-nodtb-tegra.bin"))))
            + [UInt8](try Data(contentsOf: URL(fileURLWithPath: directory.file("u-boot.dtb"))))
        let good = try TegraBootImageTests.referenceImage(.t124, bct: bct, uboot: flashed, in: directory)
        _ = try directory.write("jetson-tk1-emmc.img", good)
        let profile = try profileCopy(in: directory, replacing: [("PM375_Hynix_2GB_H5TC4G63AFR_RDA_924MHz.bct", "jetson-tk1-emmc.img")])
        let accepted = try flash(profile)
        #expect(accepted.status == 69, "inputs accepted, then no board: \(accepted.stderr)")
        let other = try TegraBootImageTests.referenceImage(.t124, bct: bct, uboot: flashed + [0], in: directory)
        _ = try directory.write("jetson-tk1-emmc.img", other)
        let refused = try flash(profile)
        #expect(refused.status == 65)
        #expect(refused.stderr.contains("Bootloader[0].Length") && refused.stderr.contains("jetson-tk1-emmc.img"), "\(refused.stderr)")
    }
}
