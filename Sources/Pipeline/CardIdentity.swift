#if canImport(Glibc)
import Glibc
#endif
import BlockDevices
import Foundation
import ImageIO

/// Which card this is, across insertions (issue 16: cards remembered).
///
/// Strong: the SD card's CID register (manufacturer, product, serial number, date), which
/// the kernel shows in sysfs when the card sits on an MMC host. Weaker: behind a USB reader
/// the CID cannot be read, so the identity is the reader's serial (the reader's, not the
/// card's: every card in that reader shares it), the card's size, and a fingerprint of its
/// first 64 KiB as found at insertion. Two cards of the same size with the same first
/// sectors (blank, or written with the same image) in the same reader look alike, and a
/// card written elsewhere since looks new: said so wherever it is shown.
public struct CardIdentity: Sendable, Equatable, Hashable, CustomStringConvertible {
    public enum Strength: String, Sendable { case cid, reader }
    /// "cid-<32 hex>" or "rd-<16 hex>": short enough to type into `provision cards forget`.
    public let id: String
    public let strength: Strength
    /// What it was made of, for people.
    public let detail: String

    public init(id: String, strength: Strength, detail: String) {
        self.id = id
        self.strength = strength
        self.detail = detail
    }

    public var description: String {
        switch strength {
        case .cid: "card \(id) (SD CID)"
        case .reader: "card \(id) (\(detail); weaker than an SD CID: the reader's serial, the size and the first sectors)"
        }
    }

    static let fingerprintBytes = 64 << 10

    /// The identity of the card behind `target` (open O_DIRECT), read before anything is
    /// written. Nil for a regular file.
    static func read(_ target: WriteTarget, facts: DeviceFacts?) -> CardIdentity? {
        guard target.kind == .blockDevice, let facts else { return nil }
        if let cid = try? String(contentsOfFile: facts.syspath + "/device/cid", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines), cid.count == 32, cid.allSatisfy(\.isHexDigit) {
            return CardIdentity(id: "cid-" + cid.lowercased(), strength: .cid, detail: "SD CID \(cid.lowercased())")
        }
        let buffer = AlignedBuffer(capacity: fingerprintBytes, alignment: target.alignment)
        let n = pread(target.fd, buffer.bytes, fingerprintBytes, 0)
        guard n > 0 else { return nil }
        let serial = facts.serial ?? "none"
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        func mix<S: Sequence>(_ bytes: S) where S.Element == UInt8 { for b in bytes { hash = (hash ^ UInt64(b)) &* 0x100_0000_01b3 } }
        mix(Array(serial.utf8))
        mix(withUnsafeBytes(of: facts.size.littleEndian) { Array($0) })
        mix(UnsafeRawBufferPointer(start: buffer.bytes, count: n))
        let id = "rd-" + String(repeating: "0", count: 16 - String(hash, radix: 16).count) + String(hash, radix: 16)
        return CardIdentity(id: id, strength: .reader, detail: "reader serial \(serial), \(facts.size) bytes, first sectors as found")
    }
}

/// What the station concluded about a card, kept in the ledger.
public enum CardVerdict: String, Sendable {
    case good, repaired, counterfeit, failing
    /// Verdicts that refuse the card on sight until an admin forgets it.
    public var refuses: Bool { self == .counterfeit || self == .failing }
}

/// The write speed a card is rated for, from its SD Status register (SSR), which the kernel
/// shows in sysfs (`ssr`, 128 hex digits) where the card sits on an MMC host. Behind a USB
/// reader there is no SSR to read: the rating is then unknown, and said so.
public struct RatedSpeed: Sendable, Equatable, CustomStringConvertible {
    /// "Class 10, U3, V30"
    public let label: String
    /// The minimum sequential write speed the rating promises, in bytes a second.
    public let bytesPerSecond: Double

    public init(label: String, bytesPerSecond: Double) {
        self.label = label
        self.bytesPerSecond = bytesPerSecond
    }

    public var description: String { "\(label): \(Int(bytesPerSecond / 1e6)) MB/s" }

    /// Parses the SSR as the kernel prints it (16 words of 8 hex digits, most significant
    /// bit 511 first). SPEED_CLASS is bits 447–440, UHS_SPEED_GRADE bits 399–396,
    /// VIDEO_SPEED_CLASS bits 391–384 (SD Physical Layer Simplified Specification, 4.10.2).
    public static func parse(ssr: String) -> RatedSpeed? {
        let hex = Array(ssr.filter { !$0.isWhitespace })
        guard hex.count == 128, hex.allSatisfy(\.isHexDigit) else { return nil }
        func byte(at bit: Int) -> Int { Int(String(hex[((511 - bit) / 8 * 2)...((511 - bit) / 8 * 2 + 1)]), radix: 16)! }
        var parts: [String] = []
        var rate = 0
        let classes = [1: 2, 2: 4, 3: 6, 4: 10]
        if let c = classes[byte(at: 447)] { parts.append("Class \(c)"); rate = max(rate, c) }
        let uhs = byte(at: 399) >> 4
        if uhs == 1 || uhs == 3 { parts.append("U\(uhs)"); rate = max(rate, uhs == 1 ? 10 : 30) }
        let video = byte(at: 391)
        if [6, 10, 30, 60, 90].contains(video) { parts.append("V\(video)"); rate = max(rate, video) }
        guard rate > 0 else { return nil }
        return RatedSpeed(label: parts.joined(separator: ", "), bytesPerSecond: Double(rate) * 1e6)
    }

    /// The rating of the card at `syspath` (a block device's sysfs directory); nil when
    /// the card does not say (behind a USB reader, or class 0).
    public static func read(syspath: String) -> RatedSpeed? {
        (try? String(contentsOfFile: syspath + "/device/ssr", encoding: .utf8)).flatMap { parse(ssr: $0) }
    }
}
