/// The boot ROM half of recovery: UID, RCM version query, miniloader download.
struct BootROMSession {
    let transport: any USBTransport
    let chip: TegraChip
    let timeoutMilliseconds: Int

    /// The UID the boot ROM sends first, or nil when the read times out: the miniloader
    /// is then already running (a board left in recovery after an earlier attempt).
    func readUID() throws -> [UInt8]? {
        let uid: [UInt8]
        do {
            uid = try transport.read(upTo: 16, timeoutMilliseconds: timeoutMilliseconds)
        } catch let error as TegraError where error.kind == .timeout {
            return nil
        }
        guard uid.count == chip.uidLength else {
            throw TegraError(.unexpectedUIDLength(uid.count),
                "\(transport.location): the boot ROM sent a \(uid.count)-byte UID; a \(chip) sends \(chip.uidLength) bytes. "
                + "Power-cycle the board into recovery mode (hold FORCE RECOVERY, press RESET) and retry")
        }
        return uid
    }

    /// Opcode 0x6; the reply is the boot ROM's RCM version. This is the first signed message,
    /// so a board that refuses zero-key CMACs (secure boot fused) shows itself here.
    func queryRCMVersion() throws -> UInt32 {
        let message = try RCMMessage(version: chip.rcmVersion, opcode: .rcmVersion)
        try transport.write(message.bytes, timeoutMilliseconds: timeoutMilliseconds)
        let reply = try readReplyWord(after: "the RCM version query")
        guard reply >> 16 == chip.rcmVersion.versionWord >> 16 else {
            throw TegraError(.secureBoot,
                "\(transport.location): the boot ROM answered the RCM version query with \(hex32(reply)) instead of "
                + "version \(hex32(chip.rcmVersion.versionWord)): it rejected a message signed with the zero-key AES-CMAC. "
                + "This board has secure boot fused and needs RSA-PSS signed messages, which provision does not support")
        }
        return reply
    }

    /// Opcode 0x4 carrying the miniloader; the boot ROM must answer 0 and then starts it.
    func sendMiniloader(_ miniloader: [UInt8], entry: UInt32, shouldStop: () -> Bool,
                        progress: (Double) -> Void) throws {
        let message = try RCMMessage(version: chip.rcmVersion, opcode: .downloadExecute, args: [entry],
                                     payload: miniloader)
        // Chunks are a multiple of 4096, so the USB transfers are the same as one write.
        let chunk = 16 * USBTransferRules.maxTransferLength
        var offset = 0
        while offset < message.bytes.count {
            if shouldStop() { throw TegraError(.cancelled, "\(transport.location): cancelled during the miniloader download") }
            let end = min(message.bytes.count, offset + chunk)
            try transport.write(Array(message.bytes[offset..<end]), timeoutMilliseconds: timeoutMilliseconds)
            offset = end
            progress(Double(offset) / Double(message.bytes.count))
        }
        let reply = try readReplyWord(after: "the miniloader download")
        guard reply == 0 else {
            throw TegraError(.rcmRejected(reply),
                "\(transport.location): the boot ROM refused the miniloader (\(miniloader.count) bytes, entry \(hex32(entry))) "
                + "with status \(hex32(reply)); check that the profile's miniloader is the \(chip) one")
        }
    }

    private func readReplyWord(after what: String) throws -> UInt32 {
        let reply: [UInt8]
        do {
            reply = try transport.read(upTo: 4, timeoutMilliseconds: timeoutMilliseconds)
        } catch let error as TegraError where error.kind == .timeout {
            throw TegraError(.timeout, "\(transport.location): no answer from the boot ROM to \(what) within \(timeoutMilliseconds) ms")
        }
        guard reply.count == 4 else {
            throw TegraError(.protocolViolation, "\(transport.location): the boot ROM answered \(what) with \(reply.count) bytes, expected 4")
        }
        return reply.loadLE32(at: 0)
    }
}
