import Accounts
import Foundation
import ImageIO
import Tegra

extension Profile {
    /// How far into a compressed image the check decompresses to reach the partitions'
    /// superblocks (raw images are read where needed, at no cost). Raspberry Pi OS puts its
    /// root at 532 MiB. Measured on the test image (root at 100 MiB, mostly empty), the whole
    /// `provision config check` took 0.26 s with .zst and 0.94 s with .xz (debug build, busy
    /// machine); an image full of data decompresses slower. Partitions beyond the reach are
    /// checked against the table only.
    public static let partitionProbeReach: UInt64 = 1 << 30

    /// Everything the files a profile names can tell before a card is written — the checks
    /// the daemon's start, its reload and `provision config check` make, so a card is never
    /// written for an injection that was bound to fail:
    ///
    /// - every named file (image, bmap, blobs, Tegra inputs) exists and is readable;
    /// - the bmap (named, or found next to the image) parses and is the image's;
    /// - the image decodes (its format by magic bytes; a corrupt start is an error now);
    /// - blobs fit between the image's partitions;
    /// - the image's partition table holds every `[[partitions]]` entry at its stated
    ///   start and size, and the root partition users go into — by number or label, and
    ///   ext2/3/4 — by the injector's own rule (`Injector.locate`).
    ///
    /// Errors carry the line of the key to fix.
    public func checkFiles(reach: UInt64 = Profile.partitionProbeReach) throws {
        try checkInputsExist()
        if kind == .tegra, let tegra {
            // Read, checked and built as a board's job would (only its UID unknown): the
            // soc, ids and boot device, the BCT's boot image, the DTB, the environment.
            do { _ = try tegraProfile().loadInputs() } catch let error as TegraError {
                throw tegra.location.error(error.message)
            } catch {
                throw tegra.location.error("\(error)")
            }
            return
        }
        guard kind == .sd, let image else { return }
        let source: ImageSource
        do throws(ImageIOError) { source = try ImageSource(path: image.file) } catch {
            throw image.location.error(error.message)
        }
        if let bmapPath = bmapFile(image) {
            do throws(ImageIOError) {
                try Bmap.load(path: bmapPath).checkSize(of: source)
            } catch {
                throw image.location.error(error.message)
            }
        }
        let start: ImageStart
        do throws(ImageIOError) { start = try ImageStart.read(source, partitionsWithin: source.format == .raw ? .max : reach) } catch {
            throw image.location.error(error.message)
        }
        if !blobs.isEmpty {
            try start.head.withUnsafeBytes { try checkBlobs(againstImageStart: $0) }
        }
        guard inject || !partitions.isEmpty else { return }
        let table: PartitionTable
        switch start.table {
        case .success(let t): table = t
        case .failure(let error):
            let location = root?.location ?? partitions.first?.location ?? image.location
            throw location.error("the image's partition table cannot be read (\(error.message)); users are injected into a partition of it")
        }
        try checkDeclaredPartitions(against: table, image: image.file)
        guard inject, let root else { return }
        let locator: RootLocator = switch root.selector {
        case .partition(let number): .partition(number)
        case .label(let label): .label(label)
        }
        if start.probedEveryPartition {
            do throws(AccountsError) {
                _ = try Injector.locate(root: locator, table: table, source: image.file) { start.windows[$0.number] ?? [] }
            } catch {
                throw root.location.error(error.message)
            }
        } else if case .partition(let number) = root.selector, table.partition(number: number) == nil {
            throw root.location.error("\(image.file) has no partition \(number) (\(table.scheme.rawValue) partitions: \(table.partitions.map { String($0.number) }.joined(separator: ", ")))")
        }
    }

    /// The bmap the write will use: the named one, or the one bmaptool's rule finds.
    func bmapFile(_ image: Image) -> String? {
        switch image.bmap {
        case .file(let path): path
        case .discover: Bmap.locate(forImage: image.file)
        case .none: nil
        }
    }

    /// A `[[partitions]]` entry describes the image: one the image does not have, or at
    /// another place, means the profile belongs to another image.
    func checkDeclaredPartitions(against table: PartitionTable, image: String) throws {
        for declared in partitions {
            guard let found = table.partition(number: declared.number) else {
                throw declared.location.error("\(image) has no partition \(declared.number) (\(table.scheme.rawValue) partitions: \(table.partitions.map { String($0.number) }.joined(separator: ", ")))")
            }
            if let start = declared.start, start != found.start {
                throw declared.location.error("partition \(declared.number) of \(image) starts at byte \(found.start), not \(start)")
            }
            if let size = declared.size, size != found.size {
                throw declared.location.error("partition \(declared.number) of \(image) is \(found.size) bytes, not \(size)")
            }
        }
    }
}

/// The start of an image as it lands on a card (decompressed): its first MiB, with the
/// partition table, and the first bytes of each partition within reach, for probing.
struct ImageStart {
    var head: [UInt8]
    var table: Result<PartitionTable, AccountsError>
    /// Partition number → its first `FilesystemProbe.probeLength` bytes (fewer at the image's end).
    var windows: [Int: [UInt8]] = [:]
    /// False when a partition starts beyond the reach: its filesystem is then unknown here.
    var probedEveryPartition = true

    static let headLength = 1 << 20

    /// Reads forward only (a compressed stream cannot seek): the head, then each partition's
    /// window in the order of their starts, skipping what lies between.
    static func read(_ source: ImageSource, partitionsWithin reach: UInt64) throws(ImageIOError) -> ImageStart {
        let probeLength = FilesystemProbe.probeLength
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: headLength, alignment: 4096)
        defer { buffer.deallocate() }
        func read(_ count: Int) throws(ImageIOError) -> [UInt8] {
            var filled = 0
            while filled < count {
                let n = try source.read(into: buffer.baseAddress! + filled, count: count - filled)
                if n == 0 { break }
                filled += n
            }
            return Array(UnsafeRawBufferPointer(rebasing: buffer[0..<filled]))
        }
        let head = try read(headLength)
        var start = ImageStart(head: head, table: Result { () throws(AccountsError) in try PartitionTable.parse(bytes: head) })
        guard case .success(let table) = start.table else { return start }
        for partition in table.partitions.filter({ !$0.isExtendedContainer }).sorted(by: { $0.start < $1.start }) {
            let length = Int(min(UInt64(probeLength), partition.size))
            let end = partition.start + UInt64(length)
            if end <= UInt64(head.count) {
                start.windows[partition.number] = Array(head[Int(partition.start)..<Int(end)])
                continue
            }
            guard partition.start >= source.position, end <= reach else {
                start.probedEveryPartition = false
                continue
            }
            try source.skip(partition.start - source.position, scratch: buffer)
            start.windows[partition.number] = try read(length)
        }
        return start
    }
}
