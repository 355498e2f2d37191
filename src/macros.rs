//! Macros shared by the adapters.

/// The accessors every adapter has for the stream it pulls from (as futures-util's
/// `delegate_access_inner!`). The adapter keeps its stream in its `core`; a `try_` adapter's
/// core reads it through `IntoStream` (`try`).
macro_rules! delegate_access_inner {
    ($inner:ty) => {
        delegate_access_inner!(@docs $inner,
            self => self.core.get_ref(),
            self => self.core.get_mut(),
            self => self.project().core.get_pin_mut(),
            self => self.core.into_inner());
    };
    ($inner:ty, try) => {
        delegate_access_inner!(@docs $inner,
            self => &self.core.get_ref().0,
            self => &mut self.core.get_mut().0,
            self => self.project().core.get_pin_mut().project().0,
            self => self.core.into_inner().0);
    };
    (@docs $inner:ty, $s1:ident => $r:expr, $s2:ident => $m:expr, $s3:ident => $p:expr,
        $s4:ident => $o:expr) => {
        /// Acquires a reference to the underlying stream that this combinator is pulling from.
        pub fn get_ref(&$s1) -> &$inner {
            $r
        }

        /// Acquires a mutable reference to the underlying stream that this combinator is
        /// pulling from. It is inadvisable to pull items from it directly: they would bypass
        /// the window.
        pub fn get_mut(&mut $s2) -> &mut $inner {
            $m
        }

        /// Acquires a pinned mutable reference to the underlying stream that this combinator
        /// is pulling from. It is inadvisable to pull items from it directly.
        pub fn get_pin_mut($s3: core::pin::Pin<&mut Self>) -> core::pin::Pin<&mut $inner> {
            $p
        }

        /// Consumes this combinator, returning the underlying stream (items it holds are
        /// dropped; claims already handed out stay valid).
        pub fn into_inner($s4) -> $inner {
            $o
        }
    };
}
