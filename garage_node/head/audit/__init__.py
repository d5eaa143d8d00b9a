"""Audits of what PCs answer (issue #20): sampling at the gateway, teacher-forced re-scoring on
a trusted engine, a sequential test per PC, quarantine, and earnings held until trusted."""
