import Foundation
import Testing
@testable import Tegra
import TestSupport

/// The boot image against the reference no one here wrote: Debian's `cbootimage` builds the BCT
/// from a config of our own (`-gbct`) and the image from it, `bct_dump` reads ours back.
// Serialized: these synchronous tests keep a cooperative-pool thread busy (CPU or a child
// process); one at a time leaves the pool to the async suites (the station's jobs await on it).
@Suite(.serialized, .ownThread) struct TegraBootImageTests {
    /// cbootimage's `-t` argument, the image config's `Version`, and a `.bct.cfg` of our own:
    /// eMMC, 16 KiB blocks, 512-byte pages, one SDRAM set with a few fields.
    static func bctConfig(_ chip: TegraChip, partition: UInt32 = 0x0100_0000, blockSize: Int = 0x4000,
                          pageSize: Int = 0x200, odm: UInt32 = 0x8008_0000) -> String {
        let version = BCTLayout.forChip(chip).bootDataVersion
        return """
        # written by provision's tests (format: cbootimage's .bct.cfg)
        Version       = \(String(format: "0x%08x", version));
        BlockSize     = \(String(format: "0x%x", blockSize));
        PageSize      = \(String(format: "0x%x", pageSize));
        PartitionSize = \(String(format: "0x%08x", partition));
        OdmData       = \(String(format: "0x%08x", odm));
        DevType[0] = NvBootDevType_Sdmmc;
        DeviceParam[0].SdmmcParams.ClockDivider = 0x0000000a;
        DeviceParam[0].SdmmcParams.DataWidth    = NvBootSdmmcDataWidth_8Bit;
        SDRAM[0].MemoryType          = NvBootMemoryType_Ddr3;
        SDRAM[0].PllMInputDivider    = 0x00000001;
        SDRAM[0].PllMFeedbackDivider = 0x0000004d;

        """
    }

    static func tegraArgument(_ chip: TegraChip) -> String {
        switch chip {
        case .t20: "20"
        case .t30: "30"
        case .t114: "114"
        case .t124: "124"
        }
    }

    /// `cbootimage -gbct`: the raw BCT.
    static func referenceBCT(_ chip: TegraChip, in directory: TemporaryDirectory, config: String? = nil) throws -> [UInt8] {
        let cfg = try directory.write("board.bct.cfg", config ?? bctConfig(chip))
        let result = try run("cbootimage", ["-gbct", "-t", tegraArgument(chip), cfg, directory.file("board.bct")])
        guard result.status == 0 else { throw ToolFailed(description: "cbootimage -gbct: \(result.stdout) \(result.stderr)") }
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: directory.file("board.bct"))))
    }

    /// `cbootimage -tNN IMG.cfg out.img` from a BCT file and a U-Boot file.
    static func referenceImage(_ chip: TegraChip, bct: [UInt8], uboot: [UInt8], in directory: TemporaryDirectory,
                               load: UInt32 = 0x8010_8000, entry: UInt32 = 0x8010_8000, bctCopies: Int = 1) throws -> [UInt8] {
        _ = try directory.write("ref.bct", bct)
        _ = try directory.write("u-boot.bin", uboot)
        let version = BCTLayout.forChip(chip).bootDataVersion
        let cfg = try directory.write("image.cfg", """
            Version    = \(String(format: "0x%08x", version));
            Bctcopy    = \(bctCopies);
            Bctfile    = ref.bct;
            BootLoader = u-boot.bin,\(String(format: "0x%08x", load)),\(String(format: "0x%08x", entry)),Complete;

            """)
        // cbootimage resolves the config's file names against its working directory.
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/cbootimage")
        process.arguments = ["-t", tegraArgument(chip), cfg, directory.file("reference.img")]
        process.currentDirectoryURL = URL(fileURLWithPath: directory.path)
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw ToolFailed(description: "cbootimage exited \(process.terminationStatus)") }
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: directory.file("reference.img"))))
    }

    static func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> String {
        guard a.count == b.count else { return "lengths \(a.count) and \(b.count)" }
        guard let i = a.indices.first(where: { a[$0] != b[$0] }) else { return "none" }
        return "at offset 0x\(String(i, radix: 16)): \(a[i]) vs \(b[i])"
    }

    /// 1000: neither a page nor an AES-block multiple; 4096: both; 16384: exactly one block;
    /// 40,000 and 300,001: several blocks; 1: the smallest.
    static let t124Sizes = [1, 1000, 4096, 16_384, 40_000, 300_001]

    @Test(arguments: t124Sizes)
    func t124ImageIsByteIdenticalToCbootimage(size: Int) throws {
        let directory = try TemporaryDirectory()
        let bct = try Self.referenceBCT(.t124, in: directory)
        let uboot = pattern(size, seed: UInt32(size))
        let reference = try Self.referenceImage(.t124, bct: bct, uboot: uboot, in: directory)
        let ours = try TegraBootImage.build(bct: bct, uboot: uboot, loadAddress: 0x8010_8000, entryPoint: 0x8010_8000, chip: .t124)
        #expect(ours.bytes == reference, "first difference \(Self.firstDifference(ours.bytes, reference))")
        #expect(ours.bytes.count == 0x4000 + (size + 511) / 512 * 512)
    }

    @Test(arguments: [TegraChip.t20, .t30, .t114])
    func otherChipsAreByteIdenticalToCbootimage(chip: TegraChip) throws {
        for size in [1000, 40_000] {
            let directory = try TemporaryDirectory()
            let bct = try Self.referenceBCT(chip, in: directory)
            let uboot = pattern(size, seed: 77)
            let reference = try Self.referenceImage(chip, bct: bct, uboot: uboot, in: directory, load: 0x0010_8000, entry: 0x0010_8000)
            let ours = try TegraBootImage.build(bct: bct, uboot: uboot, loadAddress: 0x0010_8000, entryPoint: 0x0010_8000, chip: chip)
            #expect(ours.bytes == reference, "\(chip) \(size): first difference \(Self.firstDifference(ours.bytes, reference))")
        }
    }

    @Test func otherGeometryAndTwoBCTCopiesMatchCbootimage() throws {
        let directory = try TemporaryDirectory()
        let bct = try Self.referenceBCT(.t124, in: directory,
                                        config: Self.bctConfig(.t124, partition: 0x4000_0000, blockSize: 0x8000, pageSize: 0x800))
        let uboot = pattern(70_001, seed: 5)
        let reference = try Self.referenceImage(.t124, bct: bct, uboot: uboot, in: directory, load: 0x8010_0000, entry: 0x8010_0100, bctCopies: 2)
        let ours = try TegraBootImage.build(bct: bct, uboot: uboot, loadAddress: 0x8010_0000, entryPoint: 0x8010_0100, bctCopies: 2)
        #expect(ours.bytes == reference, "first difference \(Self.firstDifference(ours.bytes, reference))")
        #expect(ours.bootloader.startBlock == 2)
    }

    /// A BCT from elsewhere: stale bad-block table and reserved bytes, and a bootloader already
    /// in entry 0 with the same version. cbootimage recomputes the first two and moves the entry
    /// down; so must we.
    @Test(arguments: [TegraChip.t124, .t30])
    func staleFieldsAndAnExistingEntryAreHandledLikeCbootimage(chip: TegraChip) throws {
        let directory = try TemporaryDirectory()
        let layout = BCTLayout.forChip(chip)
        var bct = try Self.referenceBCT(chip, in: directory)
        bct.storeLE32(0xDEAD_BEEF, at: layout.badBlockTableOffset)
        bct[layout.badBlockTableOffset + 4] = 0x33
        bct[layout.reservedOffset + 1] = 0x5A
        bct.storeLE32(1, at: layout.bootloaderUsedOffset)
        let old = layout.bootloaderEntryOffset(0)
        for (i, word) in [layout.bootDataVersion, 1, 0, 1234, 0x8000_0000, 0x8000_0000, 0].enumerated() {
            bct.storeLE32(word, at: old + 4 * i)
        }
        for i in 0..<16 { bct[old + BCTLayout.entryHashOffset + i] = UInt8(i) }
        let uboot = pattern(5000, seed: 9)
        let reference = try Self.referenceImage(chip, bct: bct, uboot: uboot, in: directory)
        let ours = try TegraBootImage.build(bct: bct, uboot: uboot, loadAddress: 0x8010_8000, entryPoint: 0x8010_8000)
        #expect(ours.bytes == reference, "first difference \(Self.firstDifference(ours.bytes, reference))")
        #expect(ours.bootloadersUsed == 2)
        #expect(BCTBootloaderEntry(reading: ours.bct, at: layout.bootloaderEntryOffset(1)).length == 1234)
    }

    @Test func bctDumpReadsTheEntryBack() throws {
        let directory = try TemporaryDirectory()
        let bct = try Self.referenceBCT(.t124, in: directory)
        let uboot = pattern(300_001, seed: 3)
        let ours = try TegraBootImage.build(bct: bct, uboot: uboot, loadAddress: 0x8010_8000, entryPoint: 0x8010_8004)
        let path = try directory.write("ours.img", ours.bytes)
        let dump = try run("bct_dump", [path])
        #expect(dump.status == 0, "\(dump.stderr)")
        for line in ["# Bootloader used       = 1;", "# Bootloader[0].Length       = 300001;",
                     "# Bootloader[0].Start block  = 1;", "# Bootloader[0].Load address = 0x80108000;",
                     "# Bootloader[0].Entry point  = 0x80108004;",
                     "# Bootloader[0].Bl AES Hash  = " + ours.bootloader.hash.hexString + ";"] {
            #expect(dump.stdout.contains(line), "bct_dump lacks \(line)")
        }
    }

    // MARK: checking an image cbootimage made

    @Test func cbootimagesOwnImagePassesTheCheck() throws {
        let directory = try TemporaryDirectory()
        let uboot = pattern(40_000, seed: 1)
        let reference = try Self.referenceImage(.t124, bct: try Self.referenceBCT(.t124, in: directory), uboot: uboot, in: directory)
        let checked = try TegraBootImage.check(image: reference, uboot: uboot, loadAddress: 0x8010_8000, entryPoint: 0x8010_8000, chip: .t124)
        #expect(checked.bytes == reference && checked.bootloader.length == 40_000)
    }

    @Test func imageForAnotherUBootNamesTheField() throws {
        let directory = try TemporaryDirectory()
        let uboot = pattern(40_000, seed: 1)
        let reference = try Self.referenceImage(.t124, bct: try Self.referenceBCT(.t124, in: directory), uboot: uboot, in: directory)
        func message(_ uboot: [UInt8], load: UInt32 = 0x8010_8000, entry: UInt32 = 0x8010_8000) throws -> String {
            let error = try #require(throws: TegraError.self) {
                try TegraBootImage.check(image: reference, uboot: uboot, loadAddress: load, entryPoint: entry)
            }
            #expect(error.kind == .invalidInput)
            return error.message
        }
        #expect(try message(pattern(40_001, seed: 1)).contains("Bootloader[0].Length is 40000"))
        #expect(try message(pattern(40_000, seed: 2)).contains("Bootloader[0].Start block"))
        #expect(try message(uboot, load: 0x8000_0000).contains("Bootloader[0].Load address"))
        #expect(try message(uboot, entry: 0x8000_0000).contains("Bootloader[0].Entry point"))
        var tampered = reference
        tampered[0x4000 + 10] ^= 1
        let error = try #require(throws: TegraError.self) {
            try TegraBootImage.check(image: tampered, uboot: Array(tampered[0x4000..<(0x4000 + 40_000)]), loadAddress: 0x8010_8000, entryPoint: 0x8010_8000)
        }
        #expect(error.message.contains("Bootloader[0].Bl AES Hash"))
    }

    @Test func changedBCTFailsItsSignature() throws {
        let directory = try TemporaryDirectory()
        let uboot = pattern(1000, seed: 1)
        var image = try Self.referenceImage(.t124, bct: try Self.referenceBCT(.t124, in: directory), uboot: uboot, in: directory)
        image[0x6A8] ^= 1  // odm_data is outside the signed section: still fine
        _ = try TegraBootImage.check(image: image, uboot: uboot, loadAddress: 0x8010_8000, entryPoint: 0x8010_8000)
        image[0x1000] ^= 1  // SDRAM parameters are signed
        let error = try #require(throws: TegraError.self) {
            try TegraBootImage.check(image: image, uboot: uboot, loadAddress: 0x8010_8000, entryPoint: 0x8010_8000)
        }
        #expect(error.message.contains("AES-CMAC"))
    }

    @Test func rawBCTAsImageAndImageAsBCTAreRefusedWithWhatToDo() throws {
        let directory = try TemporaryDirectory()
        let bct = try Self.referenceBCT(.t124, in: directory)
        let asImage = try #require(throws: TegraError.self) {
            try TegraBootImage.check(image: bct + [0], uboot: [1], loadAddress: 0, entryPoint: 0)
        }
        #expect(asImage.message.contains("Bootloader used = 0"))
        let image = try TegraBootImage.build(bct: bct, uboot: [1, 2, 3], loadAddress: 0, entryPoint: 0).bytes
        let asBCT = try #require(throws: TegraError.self) {
            try TegraBootImage.build(bct: image, uboot: [1], loadAddress: 0, entryPoint: 0)
        }
        #expect(asBCT.message.contains("checked, not completed"))
    }

    @Test func garbageAndOtherChipsAreRefused() throws {
        #expect(throws: TegraError.self) { try TegraBootImage.build(bct: pattern(8192, seed: 2), uboot: [1], loadAddress: 0, entryPoint: 0) }
        let directory = try TemporaryDirectory()
        let t30 = try Self.referenceBCT(.t30, in: directory)
        let error = try #require(throws: TegraError.self) {
            try TegraBootImage.build(bct: t30, uboot: [1], loadAddress: 0, entryPoint: 0, chip: .t124)
        }
        #expect(error.message.contains("T30") && error.message.contains("T124"))
        #expect(throws: TegraError.self) {
            try TegraBootImage.build(bct: try Self.referenceBCT(.t124, in: directory), uboot: [], loadAddress: 0, entryPoint: 0)
        }
    }

    @Test func corruptGeometryIsAnErrorNotACrash() throws {
        let directory = try TemporaryDirectory()
        var bct = try Self.referenceBCT(.t124, in: directory)
        bct.storeLE32(40, at: BCTLayout.forChip(.t124).blockSizeLog2Offset)
        let error = try #require(throws: TegraError.self) {
            try TegraBootImage.build(bct: bct, uboot: [1], loadAddress: 0, entryPoint: 0)
        }
        #expect(error.message.contains("BlockSize"))
    }
}
