import BlockDevices
import ControlProtocol
import Foundation
import ImageIO
import ProvisionCShims
import Tegra

extension Profile {
    /// The Tegra library's view of this profile's `[tegra]` table; chip defaults fill the
    /// addresses a profile may leave out.
    public func tegraProfile() throws -> TegraProfile {
        guard let t = tegra else { throw TegraError(.invalidInput, "profile \(name) has no [tegra] table") }
        guard let chip = TegraChip(socName: t.soc) else { throw TegraError(.invalidInput, "profile \(name): unknown soc \(t.soc)") }
        guard let dtb = t.ubootDTB else { throw TegraError(.invalidInput, "profile \(name): [tegra] uboot_dtb is missing") }
        guard let load = t.loadAddress ?? chip.defaultUBootLoadAddress else {
            throw TegraError(.invalidInput, "profile \(name): [tegra] load_address is missing and there is no default for \(chip)")
        }
        return TegraProfile(soc: t.soc, usbProductIDs: t.usbProductIDs, miniloader: t.miniloader, miniloaderEntry: t.miniloaderEntry,
                            bct: t.bct, uboot: t.uboot, ubootDTB: dtb, ubootBSSSize: Int(t.ubootBSSSize ?? 0x100000),
                            loadAddress: load, ramBase: t.ramBase ?? chip.defaultRAMBase, bootDevice: t.bootDevice ?? "emmc",
                            environment: t.environment.sorted { $0.key < $1.key }.map { ($0.key, $0.value) },
                            baseDirectory: (location.file as NSString).deletingLastPathComponent)
    }

    /// Whether this Tegra profile is the one for a recovery device with this product id.
    func matchesRecoveryDevice(productID: UInt16) -> Bool {
        guard kind == .tegra, let t = tegra else { return false }
        if !t.usbProductIDs.isEmpty { return t.usbProductIDs.contains(productID) }
        return TegraChip(productID: productID) == TegraChip(socName: t.soc)
    }
}

extension Station {
    /// A board in USB recovery mode: one job per board. Its re-enumeration after the
    /// miniloader starts (remove + add on the same port) belongs to the running job.
    func recoveryDevice(_ action: DeviceEvent.Action, _ usb: RecoveryUSBDevice) async {
        guard action == .add, TegraChip(productID: usb.productID) != nil else { return }
        if tegraPorts.contains(usb.syspath) { return }
        guard let profile = config.profiles.values.sorted(by: { $0.name < $1.name }).first(where: { $0.matchesRecoveryDevice(productID: usb.productID) }) else {
            logger.notice("Tegra board \(String(format: "0955:%04x", usb.productID)) at \(usb.syspath): no tegra profile in the station config matches it")
            return
        }
        tegraPorts.insert(usb.syspath)
        do {
            let record = try await ledger.insert(.init(kind: "tegra", slot: nil, device: "usb:\(usb.busNumber)-\(usb.deviceAddress)", deviceNumber: nil,
                                                       diskSequence: nil, serial: nil, unit: nil, profile: profile.name, image: nil))
            let flag = CancellationFlag()
            running[record.id] = RunningJob(record: record, cancellation: flag, deviceNumber: nil)
            publish(.init(kind: .job, job: record))
            var context = JobContext(record: record, facts: nil, profile: profile, imageOverride: nil, cancellation: flag, station: self)
            context.usb = usb
            jobRunner.start(context)
        } catch {
            tegraPorts.remove(usb.syspath)
            logger.error("cannot start a Tegra job: \(error)")
        }
    }

    func tegraJobEnded(port: String) { tegraPorts.remove(port) }
}

/// One Tegra board: RCM, miniloader, BCT, bootloader; the flasher U-Boot then writes the
/// eMMC by itself (its serial console shows the `>>>` steps).
struct TegraJob {
    let context: JobContext
    let usb: RecoveryUSBDevice
    let source: @Sendable (RecoveryUSBDevice, [UInt16]) -> any TegraDeviceSource

    /// What a job shows (and the ledger keeps) for a board that came back after "done".
    static let cameBackMessage = "flashed, but the board came back in recovery mode: it did not boot (check the BCT)"

    func run() {
        defer {
            let station = context.station, port = usb.syspath
            blockingAwait { await station.tegraJobEnded(port: port) }
        }
        let cameBackUID = UIDBox()
        do {
            guard let profile = context.profile else { throw TegraError(.invalidInput, "no tegra profile") }
            let inputs = try profile.tegraProfile().loadInputs(unitName: nil)
            let window = Double(profile.tegra?.cameBackWindow ?? TegraInputs.defaultCameBackWindow)
            let phase = TegraPhaseBox()
            let station = context.station, ownJob = context.record.id
            let flasher = TegraFlasher(source: source(usb, inputs.usbProductIDs), inputs: inputs, progress: { p, fraction in
                let state = Self.state(p)
                let progress = JobProgress(bytesDone: UInt64(fraction * 1000), bytesTotal: 1000, bytesPerSecond: 0, secondsRemaining: nil)
                if phase.state != state {
                    phase.state = state
                    context.transition(state, progress: progress)
                } else if fraction - phase.lastFraction >= 0.05 {
                    phase.lastFraction = fraction
                    context.report(progress)
                }
            }, uidCheck: { uid in
                // Before anything is written: the same board back in recovery soon after its
                // "done" did not boot; flashing it again would only repeat that, in a loop.
                guard window > 0 else { return }
                let previous = blockingAwait { try? await station.ledger.jobs(.init(limit: 500)) }?
                    .first { $0.id != ownJob && $0.kind == "tegra" && $0.unit == uid }
                if let previous, previous.state == .done, Date().timeIntervalSince(previous.updated) <= window {
                    cameBackUID.value = uid
                    throw TegraError(.cameBack, Self.cameBackMessage)
                }
            })
            let watcher = CancelWatcher(flag: context.cancellation) { flasher.cancel() }
            defer { watcher.stop() }
            let report = try flasher.run()
            if phase.state != .flashingOnDevice { context.transition(.flashingOnDevice, unit: report.uid) }
            context.transition(.done, "done — the flasher U-Boot writes \(report.flashImageBytes) bytes to eMMC boot0, checks the CRC and resets; its serial console shows the >>> steps", unit: report.uid)
        } catch let e as TegraError where e.kind == .cameBack {
            // Not flashed again; the board waits in recovery. Putting it into recovery once more
            // (or `provision tegra flash`) flashes it: this job, not a "done", is now its last.
            context.transition(.failed, e.message, unit: cameBackUID.value)
        } catch let e as TegraError {
            context.transition(context.cancellation.isCancelled ? .cancelled : .failed, e.message)
        } catch {
            context.transition(.failed, "\(error)")
        }
    }

    static func state(_ phase: TegraPhase) -> JobState {
        switch phase {
        case .rcm: .rcm
        case .miniloader: .miniloader
        case .bct: .bct
        case .bootloader: .bootloader
        case .flashingOnDevice: .flashingOnDevice
        }
    }
}

private final class UIDBox: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: String?
    var value: String? {
        get { lock.withLock { stored } }
        set { lock.withLock { stored = newValue } }
    }
}

private final class TegraPhaseBox: @unchecked Sendable {
    var state: JobState = .queued
    var lastFraction = 0.0
}

/// Forwards a job's cancellation flag to the flasher's own cancel (checked between transfers).
private final class CancelWatcher: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    init(flag: CancellationFlag, onCancel: @escaping @Sendable () -> Void) {
        let done = self.done
        Thread {
            provision_name_thread("prov-tegra-stop")
            while done.wait(timeout: .now() + .milliseconds(100)) == .timedOut {
                if flag.isCancelled { onCancel(); return }
            }
        }.start()
    }
    func stop() { done.signal() }
}
