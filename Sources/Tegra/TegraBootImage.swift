/// The eMMC boot image the boot ROM boots from: BCT copies, then the bootloader, laid out and
/// signed exactly as NVIDIA's `cbootimage` does from a config such as
///
///     Version    = 0x00400001;
///     Bctcopy    = 1;
///     Bctfile    = board.bct;
///     BootLoader = u-boot.bin,0x80108000,0x80108000,Complete;
///
/// A raw BCT (as `cbootimage -gbct` makes it) has an empty bootloader table; a board given it
/// falls back to recovery mode. Completing it means what cbootimage does (facts from its
/// `data_layout.c`, `crypto.c` and `nvbctlib_t*.c`, checked byte for byte against Debian's
/// cbootimage in the tests):
/// - the bad-block table is recomputed from the partition and block sizes, the trailing
///   reserved bytes get the padding pattern `0x80 0…`;
/// - bootloader entries with entry 0's version move down one slot; entry 0 describes the new
///   bootloader: version, start block (the first block after the BCT copies), start page 0,
///   length in bytes, load address, entry point, attribute 0, and its hash;
/// - the bootloader is written from page 0 of its block, followed by `0x80 0…` up to a whole
///   AES block and zeros up to a whole page; the image ends with that page;
/// - the BCT's signed section gets its AES-CMAC (zero key); each BCT copy starts a block.
public struct TegraBootImage: Sendable {
    public let layout: BCTLayout
    /// The whole image, as written to eMMC boot0 from offset 0.
    public let bytes: [UInt8]
    /// The completed, signed BCT (what the first copy holds).
    public let bct: [UInt8]
    public let bootloader: BCTBootloaderEntry
    public let bootloadersUsed: UInt32
    public let blockSize: Int
    public let pageSize: Int

    /// Completes `bct` for `uboot` and lays out the image (cbootimage's image build).
    /// - Parameters:
    ///   - version: entry 0's version (`Version =` of the image config; the reference configs
    ///     give the chip's boot data version, which is the default here).
    ///   - bctCopies: `Bctcopy =` (the Jetson TK1 config says 1).
    public static func build(bct raw: [UInt8], uboot: [UInt8], loadAddress: UInt32, entryPoint: UInt32,
                             chip expected: TegraChip? = nil, version: UInt32? = nil, bctCopies: Int = 1) throws -> TegraBootImage {
        let layout = try identify(raw, expected: expected, what: "the BCT")
        guard raw.count == layout.size else {
            throw TegraError(.invalidInput,
                "the BCT is \(raw.count) bytes; a \(layout.chip) BCT is \(layout.size) bytes "
                + (raw.count > layout.size ? "(a whole boot image made by cbootimage? it is checked, not completed)" : "(truncated?)"))
        }
        guard !uboot.isEmpty else { throw TegraError(.invalidInput, "the U-Boot image is empty") }
        guard uboot.count <= BCTLayout.maxBootloaderLength else {
            throw TegraError(.invalidInput, "the U-Boot image is \(uboot.count) bytes; a boot image holds at most \(BCTLayout.maxBootloaderLength) (16 MiB, cbootimage's limit)")
        }
        guard (1...8).contains(bctCopies) else { throw TegraError(.invalidInput, "BCT copies \(bctCopies): 1 to 8 are possible") }
        let geometry = try Geometry(layout: layout, bct: raw)

        var bct = raw
        geometry.resetBadBlockTable(&bct, layout: layout)
        for i in 0..<layout.reservedLength { bct[layout.reservedOffset + i] = i == 0 ? 0x80 : 0 }

        // Entries with entry 0's version move down to make room (cbootimage keeps older copies
        // of the same bootloader behind the new one); the table holds four.
        let versionInUse = bct.loadLE32(at: layout.bootloaderEntryOffset(0))
        let used = min(Int(bct.loadLE32(at: layout.bootloaderUsedOffset)), BCTLayout.maxBootloaders)
        let sameVersion = (0..<used).filter { bct.loadLE32(at: layout.bootloaderEntryOffset($0)) == versionInUse }.count
        let moving = min(sameVersion, BCTLayout.maxBootloaders - 1)
        for from in stride(from: moving - 1, through: 0, by: -1) {
            BCTBootloaderEntry(reading: bct, at: layout.bootloaderEntryOffset(from))
                .write(into: &bct, at: layout.bootloaderEntryOffset(from + 1))
        }

        let startBlock = UInt32(bctCopies)
        let entry = BCTBootloaderEntry(version: version ?? layout.bootDataVersion, startBlock: startBlock, startPage: 0,
                                       length: UInt32(uboot.count), loadAddress: loadAddress, entryPoint: entryPoint,
                                       attribute: 0, hash: try AESCMAC.tegraBootHash(uboot))
        entry.write(into: &bct, at: layout.bootloaderEntryOffset(0))
        let usedNow = UInt32(1 + moving)
        bct.storeLE32(usedNow, at: layout.bootloaderUsedOffset)
        try sign(&bct, layout: layout)

        let ubootStart = Int(startBlock) * geometry.blockSize
        let pages = (uboot.count + geometry.pageSize - 1) / geometry.pageSize
        var image = [UInt8](repeating: 0, count: ubootStart + pages * geometry.pageSize)
        for copy in 0..<bctCopies {
            image.replaceSubrange((copy * geometry.blockSize)..<(copy * geometry.blockSize + bct.count), with: bct)
        }
        image.replaceSubrange(ubootStart..<(ubootStart + uboot.count), with: uboot)
        if uboot.count % 16 != 0 { image[ubootStart + uboot.count] = 0x80 }
        return TegraBootImage(layout: layout, bytes: image, bct: bct, bootloader: entry, bootloadersUsed: usedNow,
                              blockSize: geometry.blockSize, pageSize: geometry.pageSize)
    }

    /// Checks an image made elsewhere (by cbootimage) against the U-Boot it must boot: the BCT's
    /// signature, and entry 0's length, addresses, hash and position. A mismatch is an error
    /// naming the field as `bct_dump` prints it, never a silent flash of a board that cannot boot.
    public static func check(image: [UInt8], uboot: [UInt8], loadAddress: UInt32, entryPoint: UInt32,
                             chip expected: TegraChip? = nil, name: String = "the boot image") throws -> TegraBootImage {
        let layout = try identify(image, expected: expected, what: name)
        guard image.count > layout.size else {
            throw TegraError(.invalidInput, "\(name) is \(image.count) bytes: only a BCT, no bootloader after it (give it as bct, and provision completes it)")
        }
        let bct = Array(image[0..<layout.size])
        let stored = Array(bct[layout.signatureOffset..<(layout.signatureOffset + 16)])
        guard try AESCMAC.tegraBootHash(Array(bct[layout.signedOffset...])) == stored else {
            throw TegraError(.invalidInput,
                "\(name): the BCT's AES-CMAC does not match its contents (changed after cbootimage signed it, or signed with a secure-boot key)")
        }
        let geometry = try Geometry(layout: layout, bct: bct)
        let used = bct.loadLE32(at: layout.bootloaderUsedOffset)
        guard used >= 1 else {
            throw TegraError(.invalidInput, "\(name): Bootloader used = 0, the BCT describes no bootloader; give the raw BCT as bct and provision completes it")
        }
        let entry = BCTBootloaderEntry(reading: bct, at: layout.bootloaderEntryOffset(0))
        func mismatch(_ field: String, _ found: String, _ wanted: String) -> TegraError {
            TegraError(.invalidInput, "\(name): Bootloader[0].\(field) is \(found), but \(wanted): the board would not boot this image")
        }
        guard Int(entry.length) == uboot.count else {
            throw mismatch("Length", "\(entry.length)", "the U-Boot is \(uboot.count) bytes")
        }
        guard entry.loadAddress == loadAddress else {
            throw mismatch("Load address", hex32(entry.loadAddress), "the profile loads U-Boot at \(hex32(loadAddress))")
        }
        guard entry.entryPoint == entryPoint else {
            throw mismatch("Entry point", hex32(entry.entryPoint), "the profile starts U-Boot at \(hex32(entryPoint))")
        }
        let start = Int(entry.startBlock) * geometry.blockSize + Int(entry.startPage) * geometry.pageSize
        guard start >= layout.size, start + uboot.count <= image.count, Array(image[start..<(start + uboot.count)]) == uboot else {
            throw mismatch("Start block", "\(entry.startBlock) (page \(entry.startPage), offset \(start))",
                           "the bytes there are not this U-Boot")
        }
        let hash = try AESCMAC.tegraBootHash(uboot)
        guard entry.hash == hash else {
            throw mismatch("Bl AES Hash", entry.hash.hexString, "this U-Boot hashes to \(hash.hexString)")
        }
        return TegraBootImage(layout: layout, bytes: image, bct: bct, bootloader: entry, bootloadersUsed: used,
                              blockSize: geometry.blockSize, pageSize: geometry.pageSize)
    }

    /// Stores the AES-CMAC of the signed section.
    static func sign(_ bct: inout [UInt8], layout: BCTLayout) throws {
        let mac = try AESCMAC.tegraBootHash(Array(bct[layout.signedOffset..<layout.size]))
        bct.replaceSubrange(layout.signatureOffset..<(layout.signatureOffset + 16), with: mac)
    }

    static func identify(_ bytes: [UInt8], expected: TegraChip?, what: String) throws -> BCTLayout {
        guard let layout = BCTLayout.detect(bytes) else {
            throw TegraError(.invalidInput,
                "\(what) (\(bytes.count) bytes) is not a BCT of a T20, T30, T114 or T124: no known boot data version "
                + "at any chip's offset (build it with `cbootimage -gbct -t124 board.bct.cfg board.bct`)")
        }
        if let expected, layout.chip != expected {
            throw TegraError(.invalidInput, "\(what) is a \(layout.chip) BCT (boot data version \(hex32(layout.bootDataVersion))); the profile is for \(expected)")
        }
        return layout
    }

    /// Block and page size from the BCT, and the partition size for the bad-block table.
    struct Geometry {
        let blockSizeLog2: UInt32
        let pageSizeLog2: UInt32
        let partitionSize: UInt32
        var blockSize: Int { 1 << Int(blockSizeLog2) }
        var pageSize: Int { 1 << Int(pageSizeLog2) }

        init(layout: BCTLayout, bct: [UInt8]) throws {
            blockSizeLog2 = bct.loadLE32(at: layout.blockSizeLog2Offset)
            pageSizeLog2 = bct.loadLE32(at: layout.pageSizeLog2Offset)
            partitionSize = bct.loadLE32(at: layout.partitionSizeOffset)
            // The boot ROM's pages are 512 B to 16 KiB, its blocks up to a few MiB; anything
            // else is a corrupt BCT, not a device to lay out for.
            guard (9...14).contains(pageSizeLog2) else {
                throw TegraError(.invalidInput, "the BCT's PageSize is 2^\(pageSizeLog2) bytes; expected 512 to 16384 (corrupt BCT?)")
            }
            guard (pageSizeLog2...24).contains(blockSizeLog2) else {
                throw TegraError(.invalidInput, "the BCT's BlockSize is 2^\(blockSizeLog2) bytes; expected a page (2^\(pageSizeLog2)) to 16 MiB (corrupt BCT?)")
            }
            guard (1 << Int(blockSizeLog2)) >= layout.size else {
                throw TegraError(.invalidInput, "the BCT's BlockSize (\(1 << Int(blockSizeLog2)) bytes) cannot hold the \(layout.size)-byte BCT")
            }
        }

        /// `entries_used`, the virtual block size and the block size, as cbootimage sets them:
        /// one bit per virtual block, virtual blocks at least a block and large enough that
        /// 4096 bits cover the partition. u32 arithmetic, wrapping like the C original.
        func resetBadBlockTable(_ bct: inout [UInt8], layout: BCTLayout) {
            let entries = BCTLayout.badBlockTableEntries
            let bytesPerEntry = partitionSize &+ (entries &- 1)
            let perEntry = bytesPerEntry / entries
            var log2Ceil: UInt32 = 0
            if perEntry > 0 {
                log2Ceil = UInt32(31 - perEntry.leadingZeroBitCount)
                if (UInt32(1) << log2Ceil) < perEntry { log2Ceil += 1 }
            }
            let virtualLog2 = max(log2Ceil, blockSizeLog2)
            let used = (partitionSize &+ ((UInt32(1) << virtualLog2) &- 1)) >> virtualLog2
            bct.storeLE32(used, at: layout.badBlockTableOffset)
            bct[layout.badBlockTableOffset + 4] = UInt8(truncatingIfNeeded: virtualLog2)
            bct[layout.badBlockTableOffset + 5] = UInt8(truncatingIfNeeded: blockSizeLog2)
        }
    }
}
