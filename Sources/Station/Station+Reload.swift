import ControlProtocol

extension Station {
    /// A reload that was refused: the running configuration stays, and every watcher is told
    /// why — an operator who sent SIGHUP looks at `provision watch` or the journal, not at
    /// the daemon's exit status.
    public func refuseReload(file: String, reason: String) {
        publish(.init(kind: .reload, message: "reload of \(file) refused, the running configuration stays: \(reason)"))
    }
}
