/// The host side of nv3p over an open transport: sequence numbers, ACKs, STATUS.
public final class Nv3pSession {
    let transport: any USBTransport
    /// The host's counter: the next CMD or DATA carries it, and its ACK must echo it.
    public private(set) var sequence: UInt32 = 0
    let timeoutMilliseconds: Int
    /// Checked between transfers so a cancel never leaves us blocked for long.
    let shouldStop: () -> Bool

    /// A device packet arrives whole in one bulk IN transfer of up to this many bytes.
    static let packetReadLength = 8192

    public init(transport: any USBTransport, timeoutMilliseconds: Int = USBTransferRules.defaultTimeoutMilliseconds,
                shouldStop: @escaping () -> Bool = { false }) {
        self.transport = transport
        self.timeoutMilliseconds = timeoutMilliseconds
        self.shouldStop = shouldStop
    }

    // MARK: commands

    public func getPlatformInfo() throws -> TegraPlatformInfo {
        try sendCommand(.getPlatformInfo, args: [])
        let data = try receiveData(what: "platform info")
        let info = try TegraPlatformInfo(decoding: data)
        try receiveStatus(after: "get platform info")
        return info
    }

    public func downloadBCT(_ bct: [UInt8], progress: (Double) -> Void = { _ in }) throws {
        var args = [UInt8]()
        args.appendLE32(UInt32(bct.count))
        try sendCommand(.downloadBCT, args: args)
        try sendFile(bct, progress: progress)
        try receiveStatus(after: "download BCT (\(bct.count) bytes)")
    }

    /// Note the order: STATUS comes before the data here, and nothing after it (the bootloader runs).
    public func downloadBootloader(_ image: [UInt8], loadAddress: UInt32, entry: UInt32,
                                   progress: (Double) -> Void = { _ in }) throws {
        var args = [UInt8]()
        args.appendLE64(UInt64(image.count))
        args.appendLE32(loadAddress)
        args.appendLE32(entry)
        try sendCommand(.downloadBootloader, args: args)
        try receiveStatus(after: "download bootloader (\(image.count) bytes at \(hex32(loadAddress)))")
        try sendFile(image, progress: progress)
    }

    // MARK: packets

    func checkStop() throws {
        if shouldStop() { throw TegraError(.cancelled, "\(transport.location): cancelled") }
    }

    func sendCommand(_ command: Nv3p.Command, args: [UInt8]) throws {
        try checkStop()
        let packet = Nv3p.commandPacket(command, args: args, sequence: sequence)
        try transport.write(packet, timeoutMilliseconds: timeoutMilliseconds)
        try expectAck(for: "command \(hex32(command.rawValue))")
    }

    /// Sends `file` as 64 KiB DATA packets: header+length, the data in ≤4096-byte pieces,
    /// then the checksum, each packet waiting for its ACK.
    func sendFile(_ file: [UInt8], progress: (Double) -> Void) throws {
        var offset = 0
        repeat {
            try checkStop()
            let end = min(file.count, offset + Nv3p.dataPacketLength)
            let chunk = file[offset..<end]
            var head = Nv3p.header(.data, sequence: sequence)
            head.appendLE32(UInt32(chunk.count))
            try transport.write(head, timeoutMilliseconds: timeoutMilliseconds)
            var pieceStart = offset
            while pieceStart < end {
                let pieceEnd = min(end, pieceStart + USBTransferRules.maxTransferLength)
                try transport.write(Array(file[pieceStart..<pieceEnd]), timeoutMilliseconds: timeoutMilliseconds)
                pieceStart = pieceEnd
            }
            var tail = [UInt8]()
            tail.appendLE32(Nv3p.checksum(chunk, startingFrom: Nv3p.byteSum(head)))
            try transport.write(tail, timeoutMilliseconds: timeoutMilliseconds)
            try expectAck(for: "data at offset \(offset) of \(file.count)")
            offset = end
            progress(file.isEmpty ? 1 : Double(offset) / Double(file.count))
        } while offset < file.count
    }

    func expectAck(for what: String) throws {
        let packet = try receivePacket(waitingFor: "ACK of \(what)")
        switch packet.type {
        case .ack:
            guard packet.sequence == sequence else {
                throw TegraError(.protocolViolation,
                    "\(transport.location): ACK of \(what) carries sequence \(packet.sequence), expected \(sequence)")
            }
            sequence &+= 1
        case .nack:
            let code = packet.nackCode ?? 0
            throw TegraError(.nack(code),
                "\(transport.location): the miniloader refused \(what): NACK (\(Nv3p.nackName(code)))")
        default:
            throw TegraError(.protocolViolation,
                "\(transport.location): expected ACK of \(what), got packet type \(packet.type.rawValue)")
        }
    }

    func sendAck(for packet: Nv3pReceivedPacket) throws {
        try transport.write(Nv3p.ackPacket(sequence: packet.sequence), timeoutMilliseconds: timeoutMilliseconds)
    }

    func receiveData(what: String) throws -> [UInt8] {
        let packet = try receivePacket(waitingFor: what)
        guard let data = packet.data else {
            throw TegraError(.protocolViolation,
                "\(transport.location): expected DATA with \(what), got packet type \(packet.type.rawValue)")
        }
        try sendAck(for: packet)
        return data
    }

    func receiveStatus(after what: String) throws {
        let packet = try receivePacket(waitingFor: "STATUS after \(what)")
        guard let (code, args) = packet.command, code == Nv3p.Command.status.rawValue,
              args.count == Nv3p.statusArgsLength else {
            throw TegraError(.protocolViolation,
                "\(transport.location): expected STATUS after \(what), got packet type \(packet.type.rawValue)")
        }
        try sendAck(for: packet)
        let status = args.loadLE32(at: 32)
        guard status == 0 else {
            let text = String(decoding: args[0..<32].prefix { $0 != 0 }, as: UTF8.self)
            throw TegraError(.status(status),
                "\(transport.location): \(what) failed on the device: STATUS \(Nv3p.statusName(status))"
                + (text.isEmpty ? "" : " (\"\(text)\")"))
        }
    }

    /// One device packet. It normally comes whole in one transfer, but it may come split over
    /// several (read on until the length its header announces) or padded (the extra is dropped).
    /// A lone 4-byte answer that nothing follows is the boot ROM's reply word, not nv3p: the
    /// board is still in the boot ROM (an earlier program read its UID).
    func receivePacket(waitingFor what: String) throws -> Nv3pReceivedPacket {
        try checkStop()
        var bytes = try transport.read(upTo: Self.packetReadLength, timeoutMilliseconds: timeoutMilliseconds)
        let firstTransfer = bytes.count
        while Nv3p.announcedLength(bytes).map({ bytes.count < $0 }) ?? true {
            try checkStop()
            let want = max(1, (Nv3p.announcedLength(bytes) ?? 16) - bytes.count)
            let more: [UInt8]
            do {
                more = try transport.read(upTo: min(Self.packetReadLength, max(want, USBTransferRules.maxTransferLength)),
                                          timeoutMilliseconds: timeoutMilliseconds)
            } catch let error as TegraError where error.kind == .timeout {
                if firstTransfer == 4 && bytes.count == 4 {
                    throw TegraError(.bootROMAnswered(bytes.loadLE32(at: 0)),
                        "\(transport.location): the boot ROM answered \(what) with the word \(hex32(bytes.loadLE32(at: 0))): "
                        + "the miniloader is not running")
                }
                throw TegraError(.timeout,
                    "\(transport.location): \(what): the device sent \(bytes.count) bytes of a packet and then nothing for \(timeoutMilliseconds) ms")
            }
            if more.isEmpty { break }
            bytes.append(contentsOf: more)
        }
        return try Nv3pReceivedPacket(parsing: bytes, from: "\(transport.location) (\(what))")
    }
}
