/// nv3p packet formats (tegra-rcm.md, "nv3p"): the miniloader's protocol.
public enum Nv3p {
    public static let protocolVersion: UInt32 = 1

    public enum PacketType: UInt32, Sendable {
        case command = 1, data = 2, encrypted = 3, ack = 4, nack = 5
    }

    public enum Command: UInt32, Sendable {
        case getPlatformInfo = 0x01
        case getBCT = 0x02
        case downloadBCT = 0x04
        case downloadBootloader = 0x06
        case status = 0x0A
    }

    /// Length of a STATUS command's arguments: char msg[32], u32 code, u32 flags.
    public static let statusArgsLength = 40
    /// Length of the platform info DATA payload.
    public static let platformInfoLength = 72
    /// Host DATA packets carry files in pieces of this size, each waiting for its ACK.
    public static let dataPacketLength = 65_536

    /// The u32 that makes the byte sum of the packet plus itself ≡ 0 (mod 2³²).
    public static func checksum<C: Sequence>(_ bytes: C, startingFrom partial: UInt32 = 0) -> UInt32
    where C.Element == UInt8 {
        0 &- byteSum(bytes, startingFrom: partial)
    }

    public static func byteSum<C: Sequence>(_ bytes: C, startingFrom partial: UInt32 = 0) -> UInt32
    where C.Element == UInt8 {
        var sum = partial
        for byte in bytes { sum &+= UInt32(byte) }
        return sum
    }

    /// Sum of a u32's bytes (the checksum is over bytes, not words).
    static func byteSum(ofWord word: UInt32) -> UInt32 {
        (word & 0xFF) + (word >> 8 & 0xFF) + (word >> 16 & 0xFF) + (word >> 24)
    }

    static func header(_ type: PacketType, sequence: UInt32) -> [UInt8] {
        var bytes = [UInt8]()
        bytes.appendLE32(protocolVersion)
        bytes.appendLE32(type.rawValue)
        bytes.appendLE32(sequence)
        return bytes
    }

    static func sealed(_ bytes: [UInt8]) -> [UInt8] {
        var out = bytes
        out.appendLE32(checksum(bytes))
        return out
    }

    /// CMD = header + args length + command + args + checksum.
    public static func commandPacket(_ command: Command, args: [UInt8], sequence: UInt32) -> [UInt8] {
        var bytes = header(.command, sequence: sequence)
        bytes.appendLE32(UInt32(args.count))
        bytes.appendLE32(command.rawValue)
        bytes.append(contentsOf: args)
        return sealed(bytes)
    }

    /// DATA = header + length + data + checksum (built whole; the host sends big ones in pieces).
    public static func dataPacket(_ data: [UInt8], sequence: UInt32) -> [UInt8] {
        var bytes = header(.data, sequence: sequence)
        bytes.appendLE32(UInt32(data.count))
        bytes.append(contentsOf: data)
        return sealed(bytes)
    }

    public static func ackPacket(sequence: UInt32) -> [UInt8] {
        sealed(header(.ack, sequence: sequence))
    }

    public static func nackPacket(code: UInt32, sequence: UInt32) -> [UInt8] {
        var bytes = header(.nack, sequence: sequence)
        bytes.appendLE32(code)
        return sealed(bytes)
    }

    /// The whole length a device packet announces, or nil while too few bytes are there to tell
    /// (the type is at 4, a CMD's or DATA's length at 12). An unknown type gives its bytes as they are.
    public static func announcedLength(_ bytes: [UInt8]) -> Int? {
        guard bytes.count >= 8 else { return nil }
        switch PacketType(rawValue: bytes.loadLE32(at: 4)) {
        case .ack: return 16
        case .nack: return 20
        case .command: return bytes.count >= 16 ? 24 + Int(bytes.loadLE32(at: 12)) : nil
        case .data: return bytes.count >= 16 ? 20 + Int(bytes.loadLE32(at: 12)) : nil
        case .encrypted, nil: return bytes.count
        }
    }

    /// The STATUS command's 40 argument bytes.
    public static func statusArgs(message: String, code: UInt32, flags: UInt32 = 0) -> [UInt8] {
        var text = Array(message.utf8.prefix(31))
        text.append(contentsOf: [UInt8](repeating: 0, count: 32 - text.count))
        text.appendLE32(code)
        text.appendLE32(flags)
        return text
    }

    /// What STATUS codes mean, for error messages.
    public static func statusName(_ code: UInt32) -> String {
        switch code {
        case 0: "ok"
        case 1: "unknown error"
        case 2: "device failure"
        case 3: "not implemented"
        case 4: "invalid state"
        case 5: "bad parameter"
        case 0x0B: "BCT required"
        case 0x0C: "invalid BCT"
        default: "code \(code)"
        }
    }

    public static func nackName(_ code: UInt32) -> String {
        switch code {
        case 1: "success"
        case 2: "bad command"
        case 3: "bad data"
        default: "code \(code)"
        }
    }
}

/// A packet as received and checked: type, sequence, and what follows the header.
public struct Nv3pReceivedPacket: Sendable {
    public let type: Nv3p.PacketType
    public let sequence: UInt32
    /// Bytes between the 12-byte header and the checksum.
    public let body: [UInt8]

    /// Parses one whole packet, checking version, type, declared lengths and checksum.
    public init(parsing bytes: [UInt8], from location: String) throws {
        func violation(_ what: String) -> TegraError {
            TegraError(.protocolViolation, "\(location): nv3p packet of \(bytes.count) bytes: \(what)")
        }
        guard bytes.count >= 16 else { throw violation("shorter than the 16-byte minimum") }
        let version = bytes.loadLE32(at: 0)
        guard version == Nv3p.protocolVersion else { throw violation("version \(version), expected 1") }
        guard let type = Nv3p.PacketType(rawValue: bytes.loadLE32(at: 4)), type != .encrypted else {
            throw violation("unknown packet type \(bytes.loadLE32(at: 4))")
        }
        let expectedLength: Int
        switch type {
        case .ack: expectedLength = 16
        case .nack: expectedLength = 20
        case .command:
            guard bytes.count >= 24 else { throw violation("command packet shorter than 24 bytes") }
            expectedLength = 24 + Int(bytes.loadLE32(at: 12))
        case .data:
            expectedLength = 20 + Int(bytes.loadLE32(at: 12))
        case .encrypted: expectedLength = 0
        }
        guard bytes.count >= expectedLength else {
            throw violation("announced \(expectedLength) bytes")
        }
        // The target sometimes pads a packet to a longer transfer; like tegrarcm's nv3p_read,
        // the bytes past the announced length are dropped.
        let bytes = Array(bytes.prefix(expectedLength))
        let sum = Nv3p.byteSum(bytes.dropLast(4)) &+ bytes.loadLE32(at: bytes.count - 4)
        guard sum == 0 else {
            throw violation("bad checksum (sum plus checksum is \(hex32(sum)), must be 0)")
        }
        self.type = type
        self.sequence = bytes.loadLE32(at: 8)
        self.body = Array(bytes[12..<(bytes.count - 4)])
    }

    /// For CMD: the command word and its arguments.
    public var command: (code: UInt32, args: [UInt8])? {
        guard type == .command, body.count >= 8 else { return nil }
        return (body.loadLE32(at: 4), Array(body[8...]))
    }

    /// For DATA: the data.
    public var data: [UInt8]? {
        guard type == .data else { return nil }
        return Array(body[4...])
    }

    /// For NACK: the code.
    public var nackCode: UInt32? {
        guard type == .nack else { return nil }
        return body.loadLE32(at: 0)
    }
}
