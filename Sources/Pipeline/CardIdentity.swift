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
